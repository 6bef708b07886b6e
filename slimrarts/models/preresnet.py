"""CIFAR pre-activation bottleneck ResNet as in Network Slimming (Liu et al. 2017), without ``channel_selection``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ._common import _init_weights
from .registry import register_model

__all__ = ["PreActBottleneck", "PreResNet", "preresnet20", "preresnet56", "preresnet164", "tiny_preresnet"]


class PreActBottleneck(nn.Module):
    """bn1 → relu → conv1 1x1 → bn2 → relu → conv2 3x3 (stride) → bn3 → relu → conv3 1x1 (×4), plus the shortcut.

    The shortcut is the identity, or ``downsample`` (a bias-free 1x1 conv with the stride, no norm) on the block
    input when the shape changes.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != outplanes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet for small images: conv 3x3, stages of bottlenecks, bn → relu → pool → fc.

    ``depth = 3 · n · len(widths) + 2`` with n blocks per stage; ``widths`` are the bottleneck planes per stage
    (outputs are 4× that). Stage i > 0 starts with stride 2. ``stem_width`` defaults to ``widths[0]``.
    """

    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise InputError(f"widths={widths!r} must be a non-empty sequence of positive ints")
        per_block = 3 * len(widths)
        if not isinstance(depth, int) or depth < per_block + 2 or (depth - 2) % per_block:
            raise InputError(
                f"depth={depth!r}: a PreResNet with {len(widths)} stages needs depth = {per_block}·n + 2 with n >= 1 "
                f"(e.g. {per_block + 2}, {2 * per_block + 2}, ...)"
            )
        blocks = (depth - 2) // per_block
        stem_width = widths[0] if stem_width is None else stem_width
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        inplanes = stem_width
        stages = []
        for i, planes in enumerate(widths):
            layer = []
            for b in range(blocks):
                layer.append(PreActBottleneck(inplanes, planes, stride=2 if i > 0 and b == 0 else 1))
                inplanes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*layer))
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


@register_model(family="preresnet", pre_activation=True)
def preresnet164(num_classes: int = 10, **kwargs) -> PreResNet:
    """PreResNet-164 (18 bottlenecks per stage), Network Slimming's CIFAR model: 1,703,258 parameters at 10 classes."""
    return PreResNet(depth=164, num_classes=num_classes, **kwargs)


@register_model(family="preresnet", pre_activation=True)
def preresnet56(num_classes: int = 10, **kwargs) -> PreResNet:
    """PreResNet-56 (6 bottlenecks per stage)."""
    return PreResNet(depth=56, num_classes=num_classes, **kwargs)


@register_model(family="preresnet", pre_activation=True)
def preresnet20(num_classes: int = 10, **kwargs) -> PreResNet:
    """PreResNet-20 (2 bottlenecks per stage)."""
    return PreResNet(depth=20, num_classes=num_classes, **kwargs)


@register_model(family="preresnet", pre_activation=True)
def tiny_preresnet(num_classes: int = 10, **kwargs) -> PreResNet:
    """Test-sized PreResNet-20 with planes 4/8/16: 2 blocks per stage, so both projection and identity shortcuts."""
    kwargs.setdefault("widths", (4, 8, 16))
    return PreResNet(depth=20, num_classes=num_classes, **kwargs)
