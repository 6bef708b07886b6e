"""The one epoch loop every phase runs in: resume, progress, per-epoch metrics line, checkpoint, callbacks.

A phase (training, a width search, a cell search) supplies only what differs: `run_epoch(epoch, ticker)` runs one
epoch of its steps and returns the fields of the epoch's metrics line (with `images`: samples seen), optionally
`evaluate(epoch)` adds fields that are not timed (test accuracy), and `state_dict()` / `load_state_dict()` hold
what a checkpoint must restore. `run_epochs` owns everything else, so resume, metrics and checkpoints behave the
same in every phase: with a run folder, each epoch appends its line to `metrics.jsonl` first and then writes the
checkpoint atomically; `resume=True` restores the last checkpoint (weights, optimizer state, RNG, history) and
runs only the remaining epochs, so the result equals an uninterrupted run.

In a process group (torchrun) every rank runs the loop; rank 0 alone shows progress and writes the metrics line and
the checkpoint, every rank resumes from the checkpoint rank 0 reads, and a divergence or a stopping rule found on
any rank ends the phase on all of them in the same epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from ..errors import DivergenceBase
from . import dist
from .callbacks import Callback, Event, LoopState, fire
from .checkpoint import rng_state, set_rng_state
from .progress import make_progress
from .rundir import RunDir

__all__ = ["DivergenceError", "Phase", "PhaseResult", "Ticker", "run_epochs", "set_loader_epoch"]


class DivergenceError(DivergenceBase):
    """A phase produced a non-finite loss, weight or α; the run stopped before writing that epoch.

    The last checkpoint (the last good epoch) is kept, so `--resume` can continue with changed learning rates.
    """

    def __init__(self, phase: str, epoch: int, what: str, setting: str):
        self.phase, self.epoch, self.what, self.setting = phase, epoch, what, setting
        super().__init__(f"the {phase} phase diverged in epoch {epoch}: {what} is not finite. Nothing of this "
                         f"epoch was saved; the last good checkpoint stays. Most likely at fault: {setting}. Lower it "
                         f"and continue with --resume --out <run folder> --set {setting.split(' ')[0]}=<smaller>")


_LOSSES = ("train_loss", "t_loss", "v_loss", "loss")


def _weights_setting(key: str, clips: bool) -> str:
    """The recipe settings to blame for diverged weights: the learning rate under section `key`, and its gradient
    clipping when the section has one (`clips`; tests/test_recipe.py checks each key names a resume-safe field)."""
    return f"{key}.optim.lr (the weights' learning rate{f'; or set {key}.grad_clip' if clips else ''})"


def _check_finite(name: str, epoch: int, fields: dict, watched: list[torch.Tensor], key: str,
                  clips: bool = True) -> None:
    """Raise `DivergenceError` when the epoch's losses or the watched tensors are not finite (one host sync, at the
    epoch's end, where the metrics are read anyway); in a process group, on every rank when on any."""
    err = _divergence(name, epoch, fields, watched, key, clips)
    if dist.any_true(err is not None) and err is None:  # another rank diverged: stop here too, together
        err = DivergenceError(name, epoch, "a loss or weight on another process", _weights_setting(key, clips))
    if err is not None:
        raise err


def _divergence(name: str, epoch: int, fields: dict, watched: list[torch.Tensor], key: str,
                clips: bool = True) -> DivergenceError | None:
    bad_loss = [k for k in _LOSSES if k in fields and not math.isfinite(fields[k])]
    bad_alpha = "alpha_mean" in fields and not math.isfinite(fields["alpha_mean"])
    bad_weights = bool(watched) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(watched))).all())
    if not (bad_loss or bad_alpha or bad_weights):
        return None
    if bad_alpha and not bad_loss:
        return DivergenceError(name, epoch, "α", f"{key}.optim_arch.lr (the α learning rate)")
    what = f"the {bad_loss[0].replace('_', ' ')}" if bad_loss else "a weight"
    return DivergenceError(name, epoch, what, _weights_setting(key, clips))


class Phase(Protocol):
    """What a phase supplies to `run_epochs`."""

    def run_epoch(self, epoch: int, ticker: Ticker) -> dict:
        """Run one epoch's steps; return the metrics line's fields, including `images` (samples trained on)."""
        ...

    # optional: `watched()`, the tensors that must stay finite; `evaluate(epoch)`, more fields for the line;
    # `clips_gradients`, False when the recipe section has no `grad_clip` for a divergence message to name

    def state_dict(self) -> dict:
        """Everything a checkpoint must hold to continue exactly (tensors and plain data)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclasses.dataclass
class PhaseResult:
    """What a phase did: one metrics record per epoch (all epochs, across resumes) and its times."""

    history: list[dict]
    wall_s: float  # wall time of the phase, summed over the sittings that ran it
    train_s: float  # seconds inside the epochs' steps (evaluation excluded), summed likewise

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def images_per_s(self) -> float:
        n = sum(h.get("images", 0) for h in self.history)
        return n / self.train_s if self.train_s > 0 else float("nan")


class Ticker:
    """Advances the phase's progress bar by one step; `info` text is shown beside it."""

    def __init__(self, bar, task, enabled: bool, log_every: int, on_step=None):
        self.bar, self.task, self.enabled, self.log_every, self.on_step = bar, task, enabled, log_every, on_step

    def step(self, i: int, info=None) -> None:
        """Count step `i` of the epoch (0-based); every `log_every` steps, show `info()` (a callable, so the host
        sync of reading a running metric happens only then, and only with progress on); then the STEP_END
        callbacks, if any."""
        self.bar.advance(self.task)
        if self.enabled and info is not None and (i + 1) % self.log_every == 0:
            self.bar.update(self.task, info=info())
        if self.on_step is not None:
            self.on_step(i)

    def show(self, info: str) -> None:
        """The epoch's summary (a line of its own where progress is printed as plain lines)."""
        self.bar.update(self.task, info=info, refresh=True)


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell a loader (ours, or a DataLoader with a distributed-style sampler) which epoch starts."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return


_SHOWN = ("train_loss", "train_acc", "t_loss", "t_acc", "v_acc", "test_acc")


def _summary(record: dict) -> str:
    parts = [f"ep {record['epoch'] + 1}"] + [f"{k} {record[k]:.3f}" for k in _SHOWN if k in record]
    return " ".join(parts) + f" {record['images_per_s']:.0f} img/s"


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _resume(rd: RunDir, name: str, device: torch.device) -> dict | None:
    """The phase's checkpoint to continue from (RNG restored); in a process group rank 0 reads it and every rank
    continues from that same checkpoint."""
    if not dist.active():
        return rd.resume_checkpoint(name, device)
    ckpt = dist.from_main(lambda: rd.resume_checkpoint(name, torch.device("cpu")))
    if ckpt is None:
        return None
    set_rng_state(ckpt["rng"])
    return _to_device(ckpt, device)


def run_epochs(phase: Phase, *, name: str, epochs: int, steps_per_epoch: int, device: torch.device,
               loaders: Sequence = (), run_dir=None, resume: bool = False, progress: bool = True,
               description: str | None = None, log_every: int = 50, callbacks: Iterable[Callback] = (),
               state: LoopState | None = None, config_key: str = "train") -> PhaseResult:
    """Run epochs `[start, epochs)` of `phase`, where `start` follows the last checkpoint when resuming.

    `name` is the phase's name in metrics lines and its checkpoint file (`checkpoints/<name>.pt`); each of
    `loaders` is told the epoch before it starts (seeded shuffles); `callbacks` receive the events of
    `slimrarts.engine.Event` with `state` (a `LoopState`, filled in with the epoch and its record).

    At each epoch's end the losses and the tensors of the phase's optional `watched()` (weights, α) must be finite,
    or `DivergenceError` stops the phase before that epoch's line and checkpoint are written; it names the
    setting under `config_key` (the recipe section: `search`, `finetune`, `train`) most likely at fault.
    """
    callbacks = list(callbacks)
    rd = RunDir.of(run_dir)
    state = state if state is not None else LoopState(phase=name)
    history: list[dict] = []
    start, prior_wall, train_s = 0, 0.0, 0.0
    ckpt = _resume(rd, name, device) if (resume and rd is not None) else None
    writer = rd if dist.is_main() else None  # rank 0 alone writes
    progress = progress and dist.is_main()
    world = dist.world_size()
    if ckpt is not None:
        phase.load_state_dict(ckpt)
        history = json.loads(ckpt["history"])
        start, prior_wall = ckpt["epoch"] + 1, ckpt["wall_s"]
        train_s = ckpt.get("train_s", 0.0)
        if ckpt.get("stopped"):  # a stopping rule ended the phase at that epoch
            start, state.stop = epochs, True
    if writer is not None and start < epochs:  # the run's record: where this start or resume began its work
        writer.note_first_epoch(name, start)
    t_start = time.perf_counter()
    fire(callbacks, Event.PHASE_START, state)
    with make_progress(progress) as bar:
        task = bar.add_task(description or name, total=epochs * steps_per_epoch, completed=start * steps_per_epoch,
                            info="")
        stepped = [c for c in callbacks if Event.STEP_END in getattr(c, "events", (Event.STEP_END,))]

        def on_step(i: int) -> None:
            state.step = i
            fire(stepped, Event.STEP_END, state)

        ticker = Ticker(bar, task, progress, log_every, on_step if stepped else None)
        for epoch in range(start, epochs):
            for loader in loaders:
                if loader is not None:
                    set_loader_epoch(loader, epoch)
            state.epoch, state.record = epoch, None
            fire(callbacks, Event.EPOCH_START, state)
            t0 = time.perf_counter()
            fields = phase.run_epoch(epoch, ticker)
            dt = time.perf_counter() - t0
            watched = getattr(phase, "watched", None)
            _check_finite(name, epoch, fields, list(watched()) if watched is not None else [], config_key,
                          getattr(phase, "clips_gradients", True))
            train_s += dt
            record = {"phase": name, "epoch": epoch, **fields, "epoch_s": dt,
                      "images_per_s": fields.get("images", 0) / dt if dt > 0 else float("nan")}
            if world > 1:
                record["world_size"] = world
            evaluate = getattr(phase, "evaluate", None)
            if evaluate is not None:
                record.update(evaluate(epoch))
            history.append(record)
            if writer is not None:  # the line first: a resume drops lines whose checkpoint never landed
                writer.append_metrics(record)
                writer.save_checkpoint(name, {"epoch": epoch, **phase.state_dict(), "rng": rng_state(),
                                              "history": json.dumps(history),
                                              "wall_s": prior_wall + time.perf_counter() - t_start,
                                              "train_s": train_s})
            ticker.show(_summary(record))
            state.record = record
            fire(callbacks, Event.EPOCH_END, state)
            state.stop = dist.any_true(state.stop)  # a stopping rule ends the phase on every rank together
            if state.stop:
                if writer is not None:  # record the stop, so a resume does not run the remaining epochs
                    writer.save_checkpoint(name, {"epoch": epoch, **phase.state_dict(), "rng": rng_state(),
                                              "history": json.dumps(history), "stopped": True,
                                              "wall_s": prior_wall + time.perf_counter() - t_start,
                                              "train_s": train_s})
                break
    fire(callbacks, Event.PHASE_END, state)
    return PhaseResult(history=history, wall_s=prior_wall + time.perf_counter() - t_start, train_s=train_s)
