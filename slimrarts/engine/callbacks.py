"""One callback protocol for every loop: events, the state a callback sees, and `on(event, fn)`.

As in Composer's `Algorithm.match/apply`: a callback says which events it wants (`match`) and acts on them
(`apply`). Training and search phases fire `PHASE_START`, `EPOCH_START`, `STEP_END` (after each step, on the host,
outside the step: `state.step` is the step's index in the epoch), `EPOCH_END` (after the epoch's metrics line and
checkpoint are written) and `PHASE_END`; the training step also fires `AFTER_BACKWARD` between backward and the
optimizer step (e.g. a sparsity subgradient or gradient clipping). `AFTER_BACKWARD` runs inside the step: it must
only do device work (no host sync) so the step stays capturable in a CUDA graph. A `STEP_END` callback that reads
device values syncs the host: do it every so many steps, not every step.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import InputTypeError

__all__ = ["Callback", "Event", "LoopState", "fire", "on"]


class Event(str, enum.Enum):
    """Points in a phase where callbacks run."""

    PHASE_START = "phase_start"
    EPOCH_START = "epoch_start"
    AFTER_BACKWARD = "after_backward"
    STEP_END = "step_end"
    EPOCH_END = "epoch_end"
    PHASE_END = "phase_end"


@dataclasses.dataclass
class LoopState:
    """What a callback sees: the phase, the epoch, the epoch's metrics line (at `EPOCH_END`) and the phase's objects
    (`model`, or `problem` and `search` for a search phase)."""

    phase: str
    epoch: int = 0
    step: int = 0  # the step's index within the epoch (at STEP_END)
    record: dict | None = None
    model: Any = None
    extra: dict = dataclasses.field(default_factory=dict)
    stop: bool = False  # set at EPOCH_END to end the phase after this epoch (a stopping rule); kept across a resume


class Callback:
    """Base class: set `events` (or override `match`) and implement `apply`."""

    events: tuple[Event, ...] = ()

    def match(self, event: Event, state: LoopState) -> bool:
        return event in self.events

    def apply(self, event: Event, state: LoopState) -> None:
        raise NotImplementedError


class _FunctionCallback(Callback):
    def __init__(self, events: tuple[Event, ...], fn: Callable[[LoopState], None]):
        self.events, self.fn = events, fn

    def apply(self, event: Event, state: LoopState) -> None:
        self.fn(state)

    def __repr__(self) -> str:
        return f"on({', '.join(e.value for e in self.events)}, {getattr(self.fn, '__name__', self.fn)!r})"


def on(event: Event | Iterable[Event], fn: Callable[[LoopState], None]) -> Callback:
    """A callback running `fn(state)` at `event` (or at each of several events)."""
    events = (event,) if isinstance(event, Event) else tuple(event)
    bad = [e for e in events if not isinstance(e, Event)]
    if bad:
        raise InputTypeError(f"on(): events must be slimrarts.engine.Event members, got {bad[0]!r}")
    return _FunctionCallback(events, fn)


def fire(callbacks: Iterable[Callback], event: Event, state: LoopState) -> None:
    """Run every callback that matches `event`, in order."""
    for cb in callbacks:
        if cb.match(event, state):
            cb.apply(event, state)
