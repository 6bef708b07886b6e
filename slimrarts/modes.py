"""Run a model in eval (or train) mode for a block and give every submodule its former training flag back after it.

    with evaluating(model):
        out = model(x)

The flags are restored module by module, also when the block raises, so a model with some parts frozen in eval mode
(a BatchNorm whose statistics must not move, a teacher) comes back exactly as it was; a module added inside the block
(e.g. by channel removal) takes the flag its model had before. Imports nothing of slimrarts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["evaluating", "training"]


@contextlib.contextmanager
def _mode(models: tuple[nn.Module, ...], train: bool) -> Iterator[None]:
    saved = [({m: m.training for m in model.modules()}, model.training) for model in models]
    for model in models:
        model.train(train)
    try:
        yield
    finally:
        for model, (flags, top) in zip(models, saved, strict=True):
            for m in model.modules():
                m.training = flags.get(m, top)


def evaluating(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put `models` in eval mode for the block; restore each submodule's training flag on exit."""
    return _mode(models, False)


def training(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put `models` in train mode for the block; restore each submodule's training flag on exit."""
    return _mode(models, True)
