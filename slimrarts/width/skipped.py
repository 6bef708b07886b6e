"""What width search leaves out: the warning for skipped groups, the "nothing gated" error and the MACs of the
layers left out (the coverage figure itself is `width.coverage.coverage`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import InputError
from ..modes import evaluating

if TYPE_CHECKING:
    from .gates import Gates

__all__ = ["CoverageWarning", "layer_macs", "reason_kind", "require_groups", "skipped_macs_share", "warn_gaps"]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class CoverageWarning(UserWarning):
    """Width search leaves some channels of the asked scopes ungated (the reasons are in `Gates.skipped`)."""


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per sample of every conv and linear layer, by module name, from one eval-mode forward pass.

    A conv counts out_elements · in_channels/groups · kernel size, a linear out_elements · in_features (biases,
    norms and activations are left out: this is for shares, not totals).

    Not torch-pruning's counter (`metrics.call_macs`): it counts a bias add as a MAC per output element (10 more
    for ResNet-20's classifier, 96% instead of 97% for the small biased model of tests/test_zoo.py) and times a
    transposed conv at its output positions (stride² too many); benchmarks/mac_counter_check.py compares them.
    """
    macs: dict[str, int] = {}
    batch = example_input.shape[0]

    def hook(name):
        def count(module, args, output):
            if isinstance(module, nn.Linear):
                n = output.numel() // batch * module.in_features
            elif isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input element feeds out/groups · k
                n = args[0].numel() // batch * module.out_channels // module.groups * math.prod(module.kernel_size)
            else:
                n = output.numel() // batch * module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[name] = macs.get(name, 0) + n
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    try:
        with evaluating(model):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return macs


def skipped_macs_share(gates: Gates, macs: dict[str, int] | None = None) -> float:
    """Share of the model's conv/linear MACs held by layers that read or write channels in `gates.skipped`."""
    if macs is None:
        macs = layer_macs(gates.model, gates.example_input[:1])
    total = sum(macs.values())
    touched = {name for s in gates.skipped for name in s.members}
    return sum(v for n, v in macs.items() if n in touched) / total if total else 0.0


def warn_skipped(gates: Gates, stacklevel: int = 1) -> None:
    """One CoverageWarning summarising `gates.skipped`: how many channels and what share of the MACs.

    `stacklevel` counts from the caller of `warn_skipped` (1: that caller's line).
    """
    channels = sum(s.channels for s in gates.skipped)
    try:
        share = f"{skipped_macs_share(gates):.0%}"
    except Exception:  # noqa: BLE001 - the share is a courtesy; a model the counter cannot run still warns
        share = "an unknown share"
    n = len(gates.skipped)
    groups = f"{n} channel group{'s' if n != 1 else ''}"
    what = f"{channels} channels in {groups}" if channels else groups
    first = gates.skipped[0]
    warnings.warn(
        f"width search cannot gate {what} of scope {'+'.join(gates.scopes) or '?'}; the layers reading or writing "
        f"them hold {share} of the model's conv/linear MACs. Reasons are in gates.skipped (report['skipped']), "
        f"e.g. {first.name}: {first.reason}", CoverageWarning, stacklevel=stacklevel + 1)


def _listed(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def warn_gaps(gates: Gates, stacklevel: int = 1) -> None:
    """A CoverageWarning for each kind of what the trace does not show (`gates.gaps`), naming the modules or
    parameters and the groups left unpruned for them: tied parameters; modules the trace did not see."""
    found = gates.gaps
    for cause in ("tied", "unseen"):
        groups = [g for g, c in found.skipped.items() if c == cause]
        if cause == "tied" and groups:
            params = [f"{p} (held by {' and '.join(hs)})" for p, hs in found.tied.items()]
            params += [f"{p} (also read in {where})" for p, where in found.outside.items()]
            text = (f"tied parameters: {_listed(params)}; the channel groups that would cut them are not pruned "
                    f"({_listed(groups)}; reasons in report['skipped']). Untie them (a Parameter for each module) to "
                    "prune those channels")
        elif cause == "unseen" and (groups or found.untraced):
            what = {"untraced": "did not run", "training_only": "runs in training mode only", "unused": "output unused"}
            mods = [f"{u.name} ({what[u.kind]})" for u in found.unseen]
            text = (f"the traced forward did not see {_listed(mods)}; the channel groups they may read or write are "
                    f"not pruned ({_listed(groups) if groups else 'none were gated'}; reasons in report['skipped'])")
            if found.untraced:
                x = gates.example_input
                shape = f" of input shape {list(x.shape)}" if x is not None else ""
                text += (". A module that did not run sits on a branch the trace did not take (data-dependent control "
                         f"flow; the trace is one eval-mode forward{shape}, so a branch on the batch size, on the "
                         "values or on training mode may go another way in training): if prune() calls it during the "
                         "search or fine-tuning, the run stops there. Make the branch static, or add the module to "
                         "prune.exclude to let it run")
        else:
            continue
        warnings.warn(text, CoverageWarning, stacklevel=stacklevel + 1)


def require_groups(gates: Gates, scope: str | Iterable[str] | None = None) -> None:
    """Raise ValueError (before any training) when `gates` gated nothing, listing every reason given.

    The reasons are the skipped groups of the asked scopes and the groups only other scopes would gate; a model
    with neither has no conv or linear layer whose outputs could be pruned.
    """
    if gates.groups:
        return
    if scope is None:
        scope = gates.scopes
    scopes = (scope,) if isinstance(scope, str) else tuple(scope)
    head = f"nothing to prune in this model for scope {'+'.join(scopes) or '?'}"
    entries = list(gates.skipped) + list(gates.out_of_scope)
    if not entries:
        raise InputError(f"{head}: it has no conv or linear layer with prunable outputs (only layers whose outputs "
                         "are the model's outputs)")
    lines = "\n".join(f"  - {s.name}: {s.reason}" for s in entries)
    raise InputError(f"{head}; {len(entries)} channel groups were not gated:\n{lines}")


def reason_kind(reason: str) -> str:
    """A reason without the layer names, to count kinds of gaps."""
    for key, text in (("tied weights", "tied parameters"), ("traced", "a module the trace did not see"),
                      ("grouped", "grouped convolution"), ("jointly", "GroupNorm/LayerNorm"),
                      ("reshape", "reshape that moves channels"), ("concatenation", "concatenation"),
                      ("split", "split"), ("slice", "slice"), ("parameter", "parameter outside a layer"),
                      ("cannot map", "torch-pruning index mapping failed"), ("converge", "search did not converge"),
                      ("no gate placement", "no exact gate placement"), ("tracing failed", "tracing failed"),
                      ("affine", "norm without affine")):
        if key in reason:
            return text
    return reason
