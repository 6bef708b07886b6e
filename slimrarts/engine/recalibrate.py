"""BatchNorm recalibration: re-estimate the running statistics of a model whose channels or weights have changed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..errors import InputError
from ..modes import training
from . import dist
from .epochs import set_loader_epoch
from .step import batches_on
from .task import CLASSIFICATION, Task

__all__ = ["batch_norms", "recalibrate_bn"]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int, *, device: torch.device | None = None,
                   channels_last: bool = False, epoch: int = 0, task: Task = CLASSIFICATION) -> int:
    """Replace every BatchNorm's running mean and variance by their cumulative average over `batches` batches of
    `loader` (EagleEye's adaptive BN): train-mode forwards without gradients, so weights, α and every other buffer
    are left as they were. Returns the number of batches read (0: nothing to do).

    After a cut the statistics the model carries are those of the dense (or gated) network, not of the slim one;
    each removed channel changes the inputs of the next layer's norm. The loader's epoch is set to `epoch` (and set
    back), so the same images are read on a fresh run and on a resume. `task` says how a batch is read and the
    model called (`engine.task`). In a process group each rank reads its
    shard and the statistics are averaged across the ranks.
    """
    if batches < 0:
        raise InputError(f"recalibrate_bn: batches must be >= 0, got {batches}")
    norms = batch_norms(model)
    if batches == 0 or not norms:
        return 0
    device = device if device is not None else next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    before = getattr(loader, "epoch", None)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    seen = 0
    try:
        set_loader_epoch(loader, epoch)
        with training(model):
            for x, y in batches_on(loader, device, channels_last, task):
                model(*task.train_args(x, y))  # a detection model's train-mode forward reads the targets
                seen += 1
                if seen >= batches:
                    break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        if isinstance(before, int):
            set_loader_epoch(loader, before)
    if seen == 0:
        raise InputError("recalibrate_bn: the loader yields no batches")
    dist.sync_buffers_([t for m in norms for t in (m.running_mean, m.running_var)])
    return seen
