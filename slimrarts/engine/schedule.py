"""Learning-rate schedules as plain functions of the global step."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import InputError

__all__ = ["lr_at", "schedule_fn"]


def lr_at(
    step: int,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    schedule: str = "step",
    milestones: tuple[float, ...] | list[float] = (0.5, 0.75),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    min_lr: float = 0.0,
) -> float:
    """The learning rate at global step `step` (0-based).

    `step`: multiplied by `gamma` at each milestone, a fraction of the epochs rounded down to a whole epoch
    (0.5 and 0.75 of 160 epochs: epochs 80 and 120, as in Network Slimming). `cosine`: per step from `base_lr`
    to `min_lr`. A linear warm-up over `warmup_epochs` comes first for either.
    """
    total = max(1, steps_per_epoch * epochs)
    warm = steps_per_epoch * warmup_epochs
    if step < warm:
        return base_lr * (step + 1) / warm
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        drops = sum(epoch >= int(m * epochs) for m in milestones)
        return base_lr * gamma**drops
    if schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
    raise InputError(f"schedule {schedule!r} is unknown; choose step, cosine or constant")


def schedule_fn(cfg, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """`step -> learning rate` for an optimizer config with `lr`, `schedule`, `milestones`, `gamma`,
    `warmup_epochs` and `min_lr` (an `OptimConfig` or `ArchOptimConfig`)."""

    def fn(step: int) -> float:
        return lr_at(step, base_lr=cfg.lr, steps_per_epoch=steps_per_epoch, epochs=epochs, schedule=cfg.schedule,
                     milestones=cfg.milestones, gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr)

    return fn
