"""MobileNetV2 (Sandler et al. 2018) with strides adapted to 32x32 inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ._common import _init_weights
from .registry import register_model

__all__ = ["CIFAR_SETTING", "InvertedResidual", "MobileNetV2Cifar", "mobilenetv2_cifar", "tiny_mobilenetv2"]

# (t, c, n, s): expansion, output channels, blocks, stride of the first block. ImageNet's setting with the stem
# stride and the second stage's stride set to 1, so a 32x32 input ends at 4x4.
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``divisor`` nor more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """conv1 1x1 → bn1 → ReLU6 → conv2 3x3 depthwise (stride) → bn2 → ReLU6 → conv3 1x1 → bn3, add x if it fits.

    With expansion ratio 1 there is no expansion layer: ``conv1``, ``bn1`` and ``relu1`` are None. The residual
    is added when the stride is 1 and the input and output widths are equal (``use_residual``).
    """

    def __init__(self, inplanes: int, outplanes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inplanes * expand_ratio))
        self.use_residual = stride == 1 and inplanes == outplanes
        self.conv1: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        self.relu1: nn.ReLU6 | None = None
        if expand_ratio != 1:
            self.conv1 = nn.Conv2d(inplanes, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.relu2 = nn.ReLU6()
        self.conv3 = nn.Conv2d(hidden, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.conv1 is not None:
            out = self.relu1(self.bn1(self.conv1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2: conv1 3x3 stride 1 → bn1 → ReLU6, inverted residuals (``layers``), conv2 1x1 → bn2 → ReLU6, pool,
    dropout, fc.

    Widths (stem, every stage, the last conv when ``width_mult`` > 1) are multiplied by ``width_mult`` and rounded
    to multiples of ``round_nearest``. ``setting`` rows are (t, c, n, s) as in the paper.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        setting: Sequence[Sequence[int]] = CIFAR_SETTING,
        stem_width: int = 32,
        last_width: int = 1280,
        dropout: float = 0.0,
        round_nearest: int = 8,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
            raise InputError(f"width_mult={width_mult!r} must be a positive number")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout={dropout!r} must be in [0, 1)")
        rows = [tuple(row) for row in setting]
        if not rows or any(len(row) != 4 or any(not isinstance(v, int) or v < 1 for v in row) for row in rows):
            raise InputError(f"setting={setting!r} must be a non-empty list of (t, c, n, s) rows of positive ints")
        inplanes = _make_divisible(stem_width * width_mult, round_nearest)
        self.last_width = _make_divisible(last_width * max(1.0, width_mult), round_nearest)
        self.conv1 = nn.Conv2d(in_chans, inplanes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU6()
        blocks = []
        for t, c, n, s in rows:
            outplanes = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                blocks.append(InvertedResidual(inplanes, outplanes, s if i == 0 else 1, t))
                inplanes = outplanes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(inplanes, self.last_width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.last_width)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.last_width, num_classes)
        _init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(self.dropout(torch.flatten(x, 1)))


@register_model(family="mobilenetv2")
def mobilenetv2_cifar(num_classes: int = 10, **kwargs) -> MobileNetV2Cifar:
    """MobileNetV2 for CIFAR (stem and second stage at stride 1); ``width_mult``, ``dropout`` etc. as keywords."""
    return MobileNetV2Cifar(num_classes=num_classes, **kwargs)


@register_model(family="mobilenetv2")
def tiny_mobilenetv2(num_classes: int = 10, **kwargs) -> MobileNetV2Cifar:
    """Test-sized MobileNetV2: 4 short stages (with and without expansion, residual and strided blocks)."""
    kwargs.setdefault("setting", ((1, 8, 1, 1), (3, 8, 2, 1), (3, 16, 2, 2), (3, 24, 2, 2)))
    kwargs.setdefault("stem_width", 8)
    kwargs.setdefault("last_width", 64)
    return MobileNetV2Cifar(num_classes=num_classes, **kwargs)
