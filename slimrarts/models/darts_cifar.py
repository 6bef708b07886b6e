"""The DARTS evaluation network of a genotype, in the model zoo (`create_model("darts_cifar", genotype=...)`)."""

from __future__ import annotations

from .registry import register_model

__all__ = ["darts_cifar"]


@register_model(family="darts")
def darts_cifar(num_classes: int = 10, genotype="darts_v2", C: int = 36, layers: int = 20, auxiliary: bool = False,
                drop_path: float = 0.0):
    """DARTS evaluation net of a genotype (a known name such as darts_v2, a dict, or a genotype .json/.txt file)."""
    from ..nas.eval_net import build_eval_net

    return build_eval_net(genotype, num_classes=num_classes, C=C, layers=layers, auxiliary=auxiliary,
                          drop_path=drop_path)
