"""Width search building blocks: channel groups, gates α, selection (by ratio, ℓ1 or budget), cost and latency
models, channel removal, and coverage."""

from ..search.base import prox_l1_ as prox_l1_
from .budget import budget_floor as budget_floor
from .budget import min_kept as min_kept
from .budget import parse_budget as parse_budget
from .budget import select_budget as select_budget
from .cost import CostFunction as CostFunction
from .cost import CostModel as CostModel
from .cost import build_cost_model as build_cost_model
from .cost import cost_penalty as cost_penalty
from .cost import group_layers as group_layers
from .coverage import coverage as coverage
from .flow import UntracedCallError as UntracedCallError
from .gates import Gates as Gates
from .gates import attach_gates as attach_gates
from .gates import ungated_copy as ungated_copy
from .groups import SCOPES as SCOPES
from .groups import ChannelGroup as ChannelGroup
from .groups import GateSite as GateSite
from .groups import Skipped as Skipped
from .groups import find_groups as find_groups
from .heads import raw_output_modules as raw_output_modules
from .latency import LatencyModel as LatencyModel
from .latency import TightenResult as TightenResult
from .latency import Timing as Timing
from .latency import build_latency_model as build_latency_model
from .latency import tighten as tighten
from .latency import time_models as time_models
from .norms import freeze_batchnorm as freeze_batchnorm
from .select import Selection as Selection
from .select import prunable_channels as prunable_channels
from .select import pruned_ratio as pruned_ratio
from .select import select_l1 as select_l1
from .select import select_ratio as select_ratio
from .skipped import CoverageWarning as CoverageWarning
from .skipped import require_groups as require_groups
from .surgery import ChannelSelect as ChannelSelect
from .surgery import apply_spec as apply_spec
from .surgery import fold_gates as fold_gates
from .surgery import layer_widths as layer_widths
from .surgery import load_slim as load_slim
from .surgery import read_slim_spec as read_slim_spec
from .surgery import remove_channels as remove_channels
from .surgery import save_slim as save_slim

__all__ = [
    "SCOPES", "Selection",
    "ChannelGroup", "ChannelSelect", "CostFunction", "CostModel", "CoverageWarning", "GateSite", "Gates",
    "LatencyModel", "Skipped", "TightenResult", "Timing", "UntracedCallError", "apply_spec", "attach_gates",
    "budget_floor",
    "build_cost_model", "build_latency_model", "cost_penalty", "coverage", "find_groups", "fold_gates",
    "freeze_batchnorm",
    "group_layers", "layer_widths", "load_slim", "min_kept", "parse_budget", "prox_l1_", "prunable_channels",
    "pruned_ratio", "raw_output_modules", "read_slim_spec", "remove_channels", "require_groups", "save_slim",
    "select_budget", "select_l1",
    "select_ratio", "tighten", "time_models", "ungated_copy",
]
