"""What tests/test_distributed.py runs under torchrun: slimrarts' command line with test models registered.

`python tests/dist_worker.py run <recipe> --out <dir>` is `slimrarts run ...` with three more zoo names: `test_plain`
(three convolutions, no normalisation: no batch statistics), `test_bn` (the same with batch norms) and
`test_bn_split2` (`test_bn` whose batch norms normalise each half of a batch on its own, as two processes each
normalising their half do: the single-process reference for `test_bn` over two processes).
`SLIMRARTS_TEST_DIE=<rank>:<phase>:<epoch>` makes that rank leave with `os._exit(1)` when that epoch of that phase
starts (an injected crash). With `--cases <json>` instead of a command, it runs several width recipes one after
another in one process group (`prune_recipe` for each), so one torchrun start serves several runs.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimrarts.engine import epochs
from slimrarts.models import is_model, register_model


class SmallNet(nn.Module):
    """Three convolutions with SiLU (smooth: rounding-level differences between runs are not turned into different
    gradients by a ReLU kink), each followed by a batch norm or nothing, global average pool, a linear classifier."""

    def __init__(self, num_classes: int = 10, norm: bool = True):
        super().__init__()
        make = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=not norm), make(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=not norm), make(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=not norm), make(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn1(self.conv1(x)))
        x = F.silu(self.bn2(self.conv2(x)))
        x = F.silu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class SplitBatchNorm2d(nn.BatchNorm2d):
    """In training, normalises each of `parts` consecutive slices of the batch on its own (the slices processes
    0, 1, ... take) and moves the running statistics by the mean of the slices' updates (what averaging the
    processes' running statistics gives); in evaluation, a plain BatchNorm2d."""

    parts = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        outs, means, variances = [], [], []
        # momentum None (what BN recalibration sets): the cumulative average, as nn.BatchNorm2d computes it
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        for chunk in x.chunk(self.parts):
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, factor, self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(outs)


def split_norms(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d normalising the two halves of a batch separately (in place)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SplitBatchNorm2d
    return model


MODELS = {
    "test_plain": lambda num_classes=10: SmallNet(num_classes, norm=False),
    "test_bn": lambda num_classes=10: SmallNet(num_classes, norm=True),
    "test_bn_split2": lambda num_classes=10: split_norms(SmallNet(num_classes, norm=True)),
}


def register() -> None:
    """Add the test models to the zoo (once per process)."""
    for name, make in MODELS.items():
        if not is_model(name):
            register_model(name=name)(make)


def _inject_failure() -> None:
    """SLIMRARTS_TEST_DIE=<rank>:<phase>:<epoch>: that rank exits at once when that epoch of that phase starts."""
    spec = os.environ.get("SLIMRARTS_TEST_DIE")
    if not spec:
        return
    rank, phase, epoch = spec.split(":")
    if os.environ.get("RANK") != rank:
        return
    original = epochs.fire

    def fire(callbacks, event, state):
        if event == epochs.Event.EPOCH_START and state.phase == phase and state.epoch == int(epoch):
            os._exit(1)
        return original(callbacks, event, state)

    epochs.fire = fire


def _run_cases(path: str) -> int:
    """Each case: {"recipe": <dict>, "out": <dir>}; all run in this one process group."""
    from slimrarts.commands.width import prune_recipe
    from slimrarts.engine import dist
    from slimrarts.recipe import load_recipe

    for case in json.loads(open(path).read()):
        prune_recipe(load_recipe(case["recipe"]), case["out"], progress=False)
    dist.shutdown()
    return 0


def main(argv: list[str]) -> int:
    register()
    _inject_failure()
    if argv[:1] == ["--cases"]:
        return _run_cases(argv[1])
    from slimrarts.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
