"""Torch-Pruning's criteria as one-shot baselines: scores on the dense (trained) model, no training before the cut.

Each criterion of `baselines.criteria` (`l1`, `taylor`, `fpgm`, `group-norm`) becomes a method of the registry:
it scores the gated channels, and the same selection, removal and fine-tuning as RARTS follow, so the only
difference between the rows of a comparison is the scores.
"""

from __future__ import annotations

import functools

from ..engine.task import CLASSIFICATION
from .base import BaselineResult, register_baseline
from .criteria import criterion_info, list_criteria, score_channels

__all__ = ["score_one_shot"]


def score_one_shot(name: str, model, gates, loaders, recipe, *, device, run_dir=None, resume=False,
                   progress=True, task=CLASSIFICATION) -> BaselineResult:
    """Run one-shot baseline `name`: the criterion's scores of the dense model's gated channels, α frozen.

    Registered as `functools.partial(score_one_shot, name)`; `run_dir`, `resume` and `progress` are part of the
    baseline signature and unused (nothing trains)."""
    for a in gates.alphas:
        a.requires_grad_(False)
    scored = score_channels(name, gates, loaders.train, batches=recipe.baselines.taylor_batches, device=device,
                            task=task)
    return BaselineResult(scores=scored.scores, keep=None, fit=None,
                          note=f"{scored.note} ({scored.seconds:.1f} s to score)")


for _name in list_criteria():
    _info = criterion_info(_name)
    register_baseline(_name, source=_info.source, description=f"one-shot {_info.importance} scores on the dense "
                      "model (no training before the cut)", data="none")(functools.partial(score_one_shot, _name))
