"""CIFAR basic-block ResNet (He et al. 2016) with projection shortcuts (option B)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ._common import _init_weights
from .registry import register_model

__all__ = ["BasicBlock", "ResNetCifar", "resnet20", "resnet56", "tiny_resnet"]


class BasicBlock(nn.Module):
    """conv1 3x3 (stride) → bn1 → relu1 → conv2 3x3 → bn2, add the shortcut, relu2.

    The shortcut is the identity, or ``downsample`` (1x1 conv with the stride → BN) when the shape changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNetCifar(nn.Module):
    """Basic-block ResNet for small images: conv1 3x3 → bn1 → relu, stages, global pool, fc.

    ``depth = 2 · n · len(widths) + 2`` with n blocks per stage; stage i > 0 starts with stride 2.
    """

    def __init__(
        self, depth: int = 56, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64), in_chans: int = 3
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise InputError(f"widths={widths!r} must be a non-empty sequence of positive ints")
        per_block = 2 * len(widths)
        if not isinstance(depth, int) or depth < per_block + 2 or (depth - 2) % per_block:
            raise InputError(
                f"depth={depth!r}: a CIFAR ResNet with {len(widths)} stages needs depth = {per_block}·n + 2, n >= 1 "
                f"(e.g. {per_block + 2}, {2 * per_block + 2}, ...)"
            )
        blocks = (depth - 2) // per_block
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            layer = []
            for b in range(blocks):
                layer.append(BasicBlock(inplanes, planes, stride=2 if i > 0 and b == 0 else 1))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model(family="resnet")
def resnet56(num_classes: int = 10, **kwargs) -> ResNetCifar:
    """ResNet-56 for CIFAR (9 basic blocks per stage)."""
    return ResNetCifar(depth=56, num_classes=num_classes, **kwargs)


@register_model(family="resnet")
def resnet20(num_classes: int = 10, **kwargs) -> ResNetCifar:
    """ResNet-20 for CIFAR (3 basic blocks per stage)."""
    return ResNetCifar(depth=20, num_classes=num_classes, **kwargs)


@register_model(family="resnet")
def tiny_resnet(num_classes: int = 10, **kwargs) -> ResNetCifar:
    """Test-sized ResNet-14 with widths 4/8/16: 2 blocks per stage, so both projection and identity shortcuts."""
    kwargs.setdefault("widths", (4, 8, 16))
    return ResNetCifar(depth=14, num_classes=num_classes, **kwargs)
