"""The coverage figure: the MACs reduction width search reaches on a model when every gated group is cut to
`min_channels` (measured on a real cut)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..metrics import macs_and_params
from .gates import Gates, attach_gates
from .skipped import reason_kind, skipped_macs_share
from .surgery import remove_channels

__all__ = ["coverage"]


def _min_keep(gates: Gates, min_channels: int) -> list[torch.Tensor]:
    keep = []
    for group in gates.groups:
        k = math.ceil(min(min_channels, group.size) / group.repeat)
        keep.append(torch.arange(group.num_alphas) < k)
    return keep


def coverage(model: nn.Module, example_input: torch.Tensor, scope: str | Iterable[str] = "internal", *,
             min_channels: int = 1, check: bool = True, check_modules: Iterable[str] | None = None) -> dict:
    """What width search reaches on `model`: gated and skipped channels, and the MACs reduction when every gated
    group is cut to `min_channels` channels (an α entry of a grouped conv's channels keeps `repeat` of them).

    The cut is real: a copy of `model` is gated, every group cut, and the slim copy's MACs counted (torch-pruning's
    counter, `slimrarts.metrics.macs_and_params`, batch 1), so the figure is true by construction. With `check`, the
    removal invariant of that cut is measured too (`max_abs_diff`, `max_abs_ref`), on the model's output or, with
    `check_modules`, on those submodules' outputs (a detector's raw heads: `raw_output_modules`). `model` is not
    changed.
    """
    x1 = example_input[:1]
    work = copy.deepcopy(model).eval()
    macs_before, params_before = macs_and_params(work, example_inputs=x1)
    gates = attach_gates(work, x1, scope, warn=False)
    out = {
        "gated_channels": gates.num_channels,
        "groups": len(gates.groups),
        "alphas": sum(g.num_alphas for g in gates.groups),
        "grouped_groups": sum(g.repeat > 1 for g in gates.groups),
        "skipped_groups": len(gates.skipped),
        "skipped_channels": sum(s.channels for s in gates.skipped),
        "out_of_scope_groups": len(gates.out_of_scope),
        "out_of_scope_channels": sum(s.channels for s in gates.out_of_scope),
        "skipped_macs_share": skipped_macs_share(gates) if gates.skipped else 0.0,
        "reasons": sorted({reason_kind(s.reason) for s in gates.skipped}),
        "macs": macs_before,
        "params": params_before,
    }
    if not gates.groups:
        gates.remove()
        return dict(out, macs_min=macs_before, params_min=params_before, macs_reduction=0.0)
    spec = remove_channels(gates, _min_keep(gates, min_channels), check_input=example_input if check else None,
                           check_modules=list(check_modules) if check and check_modules else None)
    macs_after, params_after = macs_and_params(work, example_inputs=x1)
    out.update(macs_min=macs_after, params_min=params_after, macs_reduction=1 - macs_after / macs_before)
    if check:
        out.update(max_abs_diff=spec["max_abs_diff"], max_abs_ref=spec["max_abs_ref"])
    return out


