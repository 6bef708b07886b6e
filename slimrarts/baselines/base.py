"""Baselines: functions that train (or just score) a gated model and say which channels lose.

They are entries of the one method registry (`slimrarts.methods`, kind `baseline`); `register_baseline` is the
decorator for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..engine.epochs import PhaseResult
from ..methods import get_method, list_methods, register_method

__all__ = ["BaselineResult", "get_baseline", "is_baseline", "list_baselines", "register_baseline", "search_like"]


@dataclasses.dataclass
class BaselineResult:
    """Per-group channel scores (higher survives) or ready keep masks, and the training phase's result (None for a
    one-shot criterion that does not train)."""

    scores: list[torch.Tensor] | None
    keep: list[torch.Tensor] | None
    fit: PhaseResult | None
    note: str


def register_baseline(name: str, *, source: str = "", description: str = "", data: str = "whole",
                      passes: int = 1, score_name: str = "", reads_reference: bool = False):
    """Decorator: `fn(model, gates, loaders, recipe, *, device, run_dir, resume, progress[, task]) ->
    BaselineResult` (`task`, an `engine.task` object, is passed to a baseline that takes it; one that does not
    runs for classification only).

    `data` is `whole` for a baseline that trains on the whole training set first, `none` for one-shot scores;
    `score_name` is what its channel scores are, as the run folder's alphas.json names them (default: `name`);
    `reads_reference`: it can keep a reference run's per-group counts (`prune.reference`).
    """
    return register_method(name, kind="baseline", source=source, description=description, has_alpha=False,
                           supports_l1=False, data=data, passes=passes if data != "none" else 0,
                           score_name=score_name or name, reads_reference=reads_reference)


def get_baseline(name: str) -> Callable:
    """The run function of baseline `name`."""
    return get_method(name, "baseline").run


def is_baseline(name: str) -> bool:
    return name in list_methods("baseline")


def list_baselines() -> list[str]:
    return sorted(list_methods("baseline"))


def search_like(recipe):
    """The search section as a `TrainConfig` (a baseline's training phase on the whole training set)."""
    return recipe.search.as_train()
