"""The schema of a topology-search recipe: data, the search, the search net, the cost penalty, the evaluation net.

Load one with `slimrarts.recipe.load_recipe(path, overrides, schema=NasRecipe)`. Defaults are DARTS' CIFAR-10
settings (50 search epochs; a 600-epoch evaluation of a 36-channel, 20-cell net).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import field
from ..methods import describe_methods, list_methods
from ..recipe import DEVICE_FIELD, NAME_FIELD, ArchOptimConfig, DataConfig, DistConfig, OptimConfig, TrainConfig

__all__ = ["NasNetConfig", "CostConfig", "NasSearchConfig", "NasTrainConfig", "NasRecipe"]


def _int_at_least(low: int) -> dict:
    return dict(check=lambda v: v >= low, allowed=f"an integer >= {low}")


def _even(v: int) -> bool:
    return v >= 2 and v % 2 == 0


@dataclasses.dataclass
class NasNetConfig:
    """The search net: initial channels, cells, intermediate nodes per cell."""

    C: int = field(16, check=_even, allowed="an even integer >= 2")
    layers: int = field(8, **_int_at_least(1))
    steps: int = field(4, **_int_at_least(1))


@dataclasses.dataclass
class CostConfig:
    """The hardware-cost penalty μ·Σ_e⟨softmax(α_e), Lat_e⟩ (tables normalised: the average operation costs 1)."""

    mode: Literal["none", "latency", "macs"] = "none"
    mu: float = field(0.002, resume_safe=True, check=lambda v: v >= 0, allowed="a number >= 0")
    batch: int = field(1, **_int_at_least(1))  # batch size the per-operation latency is measured at
    warmup: int = field(10, **_int_at_least(0))
    repeats: int = field(50, **_int_at_least(1))


@dataclasses.dataclass
class NasSearchConfig:
    """How α is learned (the fields mean what they mean in `SearchConfig`), with DARTS' optimizer settings."""

    method: str = field("rarts", check=lambda v: v in list_methods("search"),
                        allowed=lambda: f"a search algorithm: {describe_methods('search')}")
    epochs: int = field(50, **_int_at_least(1))
    lam: float = field(1.0, resume_safe=True, check=lambda v: v > 0, allowed="a number > 0")
    beta: float = field(1e-3, resume_safe=True, check=lambda v: v >= 0, allowed="a number >= 0")
    xi: float | None = field(None, check=lambda v: v > 0, allowed="a number > 0 or null (the w learning rate)")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.025, momentum=0.9, weight_decay=3e-4,
                                                                   schedule="cosine", min_lr=0.001))
    optim_y: OptimConfig | None = None
    optim_arch: ArchOptimConfig = field(default_factory=lambda: ArchOptimConfig(optimizer="adam", lr=3e-4,
                                                                          betas=[0.5, 0.999], weight_decay=1e-3))
    grad_clip: float | None = field(5.0, resume_safe=True, check=lambda v: v > 0,
                                    allowed="a number > 0 or null")  # DARTS: 5
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    cuda_graph: bool = False  # capture the search iteration in a CUDA graph (CUDA only)
    log_every: int = field(50, **_int_at_least(1))


@dataclasses.dataclass
class NasTrainConfig(TrainConfig):
    """Training the evaluation net of a genotype from scratch (DARTS' settings by default)."""

    epochs: int = field(600, **_int_at_least(1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.025, momentum=0.9, weight_decay=3e-4,
                                                                   schedule="cosine", min_lr=0.0))
    batch_size: int | None = field(96, **_int_at_least(1))  # null: data.batch_size
    C: int = field(36, check=_even, allowed="an even integer >= 2")
    layers: int = field(20, **_int_at_least(1))
    auxiliary_weight: float = field(0.4, check=lambda v: v >= 0, allowed="a number >= 0 (0: no auxiliary head)")
    drop_path: float = field(0.2, check=lambda v: 0 <= v < 1, allowed="a probability in [0, 1)")
    cutout: int = field(16, **_int_at_least(0))  # side of the cut-out square; 0: none
    grad_clip: float | None = field(5.0, resume_safe=True, check=lambda v: v > 0, allowed="a number > 0 or null")
    genotype: str | None = None  # a genotype file (.json or Genotype(...) text) or a known name (darts_v2)


@dataclasses.dataclass
class NasRecipe:
    """A topology search (`search`, `net`, `cost`) and the training of the evaluation net it finds (`train`)."""

    name: str = field("darts", **NAME_FIELD)
    seed: int = 0
    device: str = field("auto", **DEVICE_FIELD)
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=64))
    search: NasSearchConfig = field(default_factory=NasSearchConfig)
    net: NasNetConfig = field(default_factory=NasNetConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    train: NasTrainConfig = field(default_factory=NasTrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
