"""The eight DARTS candidate operations and their building blocks, looked up by name in `OPS`.

Every conv block is ReLU → Conv → BN (DARTS' order). `affine=False` is what the search net uses (its BNs carry no
learnable scale/shift, so the mixed-op weights α are the only scale), `affine=True` what the evaluation net uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["PRIMITIVES", "OPS", "ReLUConvBN", "DilConv", "SepConv", "FactorizedReduce", "Zero", "make_op",
           "is_identity"]

PRIMITIVES: tuple[str, ...] = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                               "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


class ReLUConvBN(nn.Sequential):
    """ReLU → k×k conv (no bias) → BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU → dilated depthwise k×k conv → pointwise 1×1 conv → BN (one separable block)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                   groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable blocks; the first carries the stride (DARTS' sep_conv)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine),
                         DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two stride-2 1×1 convs on offset grids, concatenated, then BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise InputError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class Zero(nn.Module):
    """The `none` operation: zeros of the output's shape (strided when the edge reduces)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


def _pool(kind: str) -> Callable[[int, int, bool], nn.Module]:
    def make(c: int, stride: int, affine: bool) -> nn.Module:
        if kind == "max":
            return nn.MaxPool2d(3, stride=stride, padding=1)
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    return make


# name -> constructor(C, stride, affine); C channels in and out.
OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda c, stride, affine: Zero(stride),
    "max_pool_3x3": _pool("max"),
    "avg_pool_3x3": _pool("avg"),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


def make_op(name: str, c: int, stride: int, affine: bool, *, search: bool = False) -> nn.Module:
    """The operation `name` on `c` channels; `search=True` follows a pooling op with a non-affine BN, as DARTS'
    search net does (so a pool's output is on the scale of the conv ops' outputs)."""
    if name not in OPS:
        raise InputError(f"operation {name!r} is unknown; choose one of {', '.join(OPS)}")
    if stride not in (1, 2):
        raise InputError(f"stride must be 1 or 2, got {stride!r}")
    op = OPS[name](c, stride, affine)
    if search and "pool" in name:
        op = nn.Sequential(op, nn.BatchNorm2d(c, affine=False))
    return op


def is_identity(op: nn.Module) -> bool:
    """True for a parameter-free pass-through (skip_connect on a normal edge), which drop-path leaves alone."""
    return isinstance(op, nn.Identity)
