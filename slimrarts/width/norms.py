"""What the width code counts as a per-channel norm, and the torch-pruning pruner for the one torch-pruning lacks.

A per-channel norm (BatchNorm, InstanceNorm, torchvision's `FrozenBatchNorm2d`) scales and shifts each channel on
its own: a gate after it folds into its scale and shift, and a cut slices its per-channel tensors. FrozenBatchNorm2d
(what torchvision's detection and segmentation backbones use when weights load) keeps `weight`, `bias`,
`running_mean` and `running_var` as buffers, not parameters, and has no `num_features`; torch-pruning does not know
it, so without a pruner its forward (`x * scale + shift`) would be traced as two anonymous element-wise ops whose
constant shift the zero check cannot see. `CUSTOMIZED_PRUNERS` makes it one graph node with a pruner that slices
the four buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["CUSTOMIZED_PRUNERS", "FROZEN_NORMS", "NORMS", "FrozenNormPruner", "freeze_batchnorm", "has_affine",
           "is_norm", "norm_width"]

FROZEN_NORMS = (FrozenBatchNorm2d,)
# per-channel norms: a gate folds into their affine scale and shift
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, *FROZEN_NORMS)
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_norm(module: object) -> bool:
    """Whether `module` normalises each channel on its own (a gate after it folds into it)."""
    return isinstance(module, NORMS)


def norm_width(module: nn.Module) -> int:
    """The channels of a per-channel norm."""
    if isinstance(module, FROZEN_NORMS):
        return module.weight.shape[0]
    return module.num_features


def has_affine(module: nn.Module) -> bool:
    """Whether a per-channel norm has a scale and shift to fold a gate into (a frozen norm always does)."""
    return isinstance(module, FROZEN_NORMS) or bool(module.affine)


class FrozenNormPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's pruning function for `FrozenBatchNorm2d`: in- and out-channels are one (as for BatchNorm);
    the kept entries of its four buffers are kept, on their device and dtype."""

    TARGET_MODULES = FROZEN_NORMS

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = torch.tensor([c for c in range(norm_width(layer)) if c not in drop], dtype=torch.long,
                            device=layer.weight.device)
        for name in _FROZEN_BUFFERS:
            setattr(layer, name, getattr(layer, name).index_select(0, keep))  # a registered buffer: stays one
        return layer

    prune_in_channels = prune_out_channels  # one width: the intra-layer dependency torch-pruning follows

    def get_out_channels(self, layer: nn.Module) -> int:
        return norm_width(layer)

    get_in_channels = get_out_channels


# the pruners `trace.build_graph` gives torch-pruning for the norms it does not know
CUSTOMIZED_PRUNERS = {FrozenBatchNorm2d: FrozenNormPruner()}


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` under `module` (itself included) by a `FrozenBatchNorm2d` with its statistics
    and affine values (γ 1 and β 0 where it has none), as torchvision builds detection backbones with weights loaded;
    returns `module` (or its replacement, when `module` is itself a BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d):
        return _frozen_copy(module)
    for name, child in list(module.named_children()):
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    like = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    if like is not None:
        frozen.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        if bn.track_running_stats:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
    return frozen
