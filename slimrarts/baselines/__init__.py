"""Baselines under the same pipeline and channel set as RARTS: Network Slimming, random pruning, and
Torch-Pruning's one-shot criteria (l1, taylor, fpgm, group-norm)."""

from . import one_shot as _one_shot  # noqa: F401  (registers "l1", "taylor", "fpgm", "group-norm")
from . import random_pruning as _random  # noqa: F401  (registers "random")
from . import slimming as _slimming  # noqa: F401  (registers "slimming")
from .base import BaselineResult as BaselineResult
from .base import get_baseline as get_baseline
from .base import is_baseline as is_baseline
from .base import list_baselines as list_baselines
from .base import register_baseline as register_baseline
from .random_pruning import reference_counts as reference_counts

__all__ = ["BaselineResult", "get_baseline", "is_baseline", "list_baselines", "reference_counts", "register_baseline"]
