"""Width search building blocks: channel groups, gates α, selection, channel removal, and coverage."""

from .coverage import CoverageWarning as CoverageWarning
from .coverage import coverage as coverage
from .coverage import require_groups as require_groups
from .gates import Gates as Gates
from .gates import attach_gates as attach_gates
from .groups import SCOPES as SCOPES
from .groups import ChannelGroup as ChannelGroup
from .groups import GateSite as GateSite
from .groups import Skipped as Skipped
from .groups import find_groups as find_groups
from .select import prox_l1_ as prox_l1_
from .select import prunable_channels as prunable_channels
from .select import pruned_ratio as pruned_ratio
from .select import select_l1 as select_l1
from .select import select_ratio as select_ratio
from .surgery import ChannelSelect as ChannelSelect
from .surgery import apply_spec as apply_spec
from .surgery import fold_gates as fold_gates
from .surgery import layer_widths as layer_widths
from .surgery import load_slim as load_slim
from .surgery import remove_channels as remove_channels
from .surgery import save_slim as save_slim

__all__ = [
    "SCOPES", "ChannelGroup", "ChannelSelect", "CoverageWarning", "GateSite", "Gates", "Skipped", "apply_spec",
    "attach_gates", "coverage", "find_groups", "fold_gates", "layer_widths", "load_slim", "prox_l1_",
    "prunable_channels", "pruned_ratio", "remove_channels", "require_groups", "save_slim", "select_l1",
    "select_ratio",
]
