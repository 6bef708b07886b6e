"""Registry of baselines: functions that train a gated model and say which channels lose."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..engine.loop import FitResult

__all__ = ["BaselineResult", "register_baseline", "get_baseline", "is_baseline", "list_baselines", "search_like"]


@dataclasses.dataclass
class BaselineResult:
    """Per-group channel scores (higher survives) or ready keep masks, and the training phase's result."""

    scores: list[torch.Tensor] | None
    keep: list[torch.Tensor] | None
    fit: FitResult
    note: str


_REGISTRY: dict[str, Callable] = {}


def register_baseline(name: str):
    """Decorator: `fn(model, gates, loaders, recipe, *, device, run_dir, resume, progress) -> BaselineResult`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"baseline {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_baseline(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ValueError(f"baseline {name!r} is unknown; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def is_baseline(name: str) -> bool:
    return name in _REGISTRY


def list_baselines() -> list[str]:
    return sorted(_REGISTRY)


def search_like(recipe):
    """The search section as a `TrainConfig` (the baselines' training phase on the whole training set)."""
    from ..recipe import TrainConfig

    s = recipe.search
    return TrainConfig(epochs=s.epochs, optim=s.optim, amp=s.amp, channels_last=s.channels_last,
                       cuda_graph=s.cuda_graph, log_every=s.log_every)
