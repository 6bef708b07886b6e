"""Baselines under the same pipeline and channel set as RARTS: Network Slimming and random pruning."""

from .base import BaselineResult as BaselineResult
from .base import get_baseline as get_baseline
from .base import is_baseline as is_baseline
from .base import list_baselines as list_baselines
from .base import register_baseline as register_baseline
from . import random_pruning as _random  # noqa: F401,E402  (registers "random")
from . import slimming as _slimming  # noqa: F401,E402  (registers "slimming")

__all__ = ["BaselineResult", "get_baseline", "is_baseline", "list_baselines", "register_baseline"]
