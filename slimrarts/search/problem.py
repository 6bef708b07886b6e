"""The network search problem (cross-entropy through `torch.func.functional_call`) and building a search state."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from ..engine import dist
from ..engine.optim import build_optimizer
from ..engine.step import autocast
from ..engine.task import CLASSIFICATION, Task
from .base import SearchState, get_search, prox_l1_

__all__ = ["NetProblem", "make_state", "make_arch_optimizer"]


class NetProblem:
    """The task's loss (`engine.task`; cross-entropy by default) of `model` run with a given set of weights and
    buffers; α are `arch` (used by hooks or ops).

    Losses and the task's running metric of tracked passes accumulate in device tensors; `read()` syncs once.
    """

    def __init__(self, model: nn.Module, arch: list[torch.Tensor], *, amp: str = "none", l1: float = 0.0,
                 penalty: Callable[[], torch.Tensor] | None = None, task: Task = CLASSIFICATION):
        self.model, self.arch, self.amp, self.l1, self.penalty, self.task = model, arch, amp, l1, penalty, task
        self.device = next(model.parameters()).device
        self._meters: dict[str, list] = {}
        self.shrink: list[torch.Tensor] | None = None  # per-entry ℓ1 strengths of `search.shrink` (set between steps)
        self.importance: list[torch.Tensor] | None = None  # Σ |α ⊙ ∇_α| over the α-steps, when a score reads it

    def loss(self, params, buffers, batch, track: str | None = None) -> torch.Tensor:
        x, target = batch
        with autocast(self.device, self.amp):
            out = functional_call(self.model, (params, buffers), self.task.train_args(x, target), strict=False)
        loss = self.task.loss(out, target)
        if track is not None:
            meter = self._meters.get(track)
            if meter is None:  # created on the first (eager) call, so a captured graph only updates them
                meter = self._meters[track] = [torch.zeros((), device=self.device) for _ in range(4)]
            with torch.no_grad():
                meter[0].add_(loss.detach() * self.task.count(target))
                running = self.task.running(out, target)
                if running is not None:  # the running metric's numerator and denominator
                    meter[1].add_(running[0])
                    meter[3].add_(running[1])
                meter[2].add_(self.task.count(target))
        return loss

    def arch_penalty(self) -> torch.Tensor | None:
        return self.penalty() if self.penalty is not None else None

    def after_arch_step(self, lr: torch.Tensor) -> None:
        if self.l1:
            prox_l1_(self.arch, lr * self.l1)
        if self.shrink is not None:  # a proximal step on the entries `search.shrink` targets (no host sync)
            prox_l1_(self.arch, torch._foreach_mul(self.shrink, lr))

    def read(self) -> dict:
        """Mean loss/accuracy per tracked meter since the last read (one host sync), then reset; in a process group,
        over every rank's samples (one all-reduce)."""
        if dist.active():
            return self._read_all()
        out = {}
        for name, meter in self._meters.items():
            self._put(out, name, *(m.item() for m in meter))
            for m in meter:
                m.zero_()
        return out

    def _put(self, out: dict, name: str, loss_sum: float, correct: float, n: float, total: float) -> None:
        if n:
            out[f"{name}_loss"] = loss_sum / n
        metric = self.task.train_metric
        if metric and total:
            out[f"{name}_{metric}"] = correct / total

    def _read_all(self) -> dict:
        names = list(self._meters)
        if not names:
            return {}
        sums = torch.stack([m.double() for name in names for m in self._meters[name]])
        dist.all_reduce_([sums], "sum")
        out = {}
        for i, name in enumerate(names):
            self._put(out, name, *sums[4 * i: 4 * i + 4].tolist())
            for m in self._meters[name]:
                m.zero_()
        return out


def make_arch_optimizer(arch: list[torch.Tensor], cfg) -> torch.optim.Optimizer:
    """Adam or SGD for α from an `ArchOptimConfig` (see `engine.optim.build_optimizer`)."""
    return build_optimizer(arch, cfg)


def make_state(model: nn.Module, arch: list[torch.Tensor], method: str, *, optim_w, optim_y=None, optim_arch,
               lam: float = 1.0, beta: float = 0.0, xi: float | None = None,
               grad_clip: float | None = None) -> SearchState:
    """A search state over `model`'s own parameters as w, with a y copy (same initial values) when needed."""
    spec = get_search(method)
    w = {k: v for k, v in model.named_parameters() if v.requires_grad}  # frozen weights stay shared and untouched
    w_buffers = dict(model.named_buffers())
    state = SearchState(w=w, w_buffers=w_buffers, opt_w=build_optimizer(w.values(), optim_w),
                        optim_arch=build_optimizer(arch, optim_arch), lam=lam, beta=beta, xi=xi, grad_clip=grad_clip,
                        scratch_buffers={k: v.detach().clone() for k, v in w_buffers.items()})
    if spec.two_nets:
        state.y = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
        state.y_buffers = {k: v.detach().clone() for k, v in w_buffers.items()}
        state.opt_y = build_optimizer(state.y.values(), optim_y or optim_w)
    return state
