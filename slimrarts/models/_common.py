"""Helpers shared by the zoo models."""

from __future__ import annotations

from torch import nn


def _init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal convs (std = sqrt(2 / (k*k*out_channels)), as Network Slimming), BN weight 1 and bias 0.

    Linear layers keep PyTorch's default init unless ``linear_std`` is given (then normal(0, std), bias 0).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
