"""The one interface every architecture-search algorithm uses: problems, state, and the method registry.

A *problem* says how to compute a loss from a set of weights, a set of buffers and a batch; its architecture
parameters α are a list of tensors (width gates, or a DARTS cell's mixed-op weights). A *state* holds the weights
w (the auxiliary net: for networks, the module's own parameters), optionally the second copy y (the primary net),
each with its own buffers (BN running statistics) and optimizer, plus the α optimizer. A *method* is a function
`step(problem, state, batch_t, batch_v)` that performs one iteration; it is registered in `slimrarts.methods`
with its properties.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from ..engine import dist
from ..errors import InputError
from ..methods import MethodInfo, get_method, list_methods, register_method

__all__ = ["Problem", "SearchState", "SearchMethod", "register_search", "get_search", "list_searches",
           "grads_of", "set_grads", "arch_step", "prox_l1_"]


class Problem(Protocol):
    """What a search algorithm needs to know about the task."""

    arch: list[torch.Tensor]

    def loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], batch: Any,
             track: str | None = None) -> torch.Tensor:
        """The loss of the net with these weights and buffers on `batch`; `track` names a meter to record into."""
        ...

    def arch_penalty(self) -> torch.Tensor | None:
        """An extra differentiable term in α alone (the cost μ·Cost(α)), or None."""
        ...

    def after_arch_step(self, lr: torch.Tensor) -> None:
        """Called after each α update with the α learning rate (e.g. an ℓ1 proximal step)."""
        ...


@dataclasses.dataclass
class SearchState:
    """The variables one search updates: w (and y), their buffers, and three optimizers."""

    w: dict[str, torch.Tensor]
    w_buffers: dict[str, torch.Tensor]
    opt_w: torch.optim.Optimizer
    optim_arch: torch.optim.Optimizer
    y: dict[str, torch.Tensor] | None = None
    y_buffers: dict[str, torch.Tensor] | None = None
    opt_y: torch.optim.Optimizer | None = None
    scratch_buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    lam: float = 1.0
    beta: float = 0.0
    xi: float | None = None  # darts2 unrolling step; None: the current w learning rate
    grad_clip: float | None = None  # clip the w (and y) gradient norm before their steps (DARTS: 5)

    def step_weights(self, which: str) -> None:
        """Optimizer step of w or y, after clipping their gradient norm when `grad_clip` is set (no host sync)."""
        if which not in ("w", "y"):
            raise InputError(f"which must be 'w' or 'y', got {which!r}")
        params, opt = (self.w_list, self.opt_w) if which == "w" else (self.y_list, self.opt_y)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        opt.step()

    @property
    def w_list(self) -> list[torch.Tensor]:
        return list(self.w.values())

    @property
    def y_list(self) -> list[torch.Tensor]:
        if self.y is None:
            raise InputError("this method needs the second weight copy y; build the state with two_nets=True")
        return list(self.y.values())


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor], *, sync: bool = True) -> list[torch.Tensor]:
    """d loss / d tensors, zeros for tensors the loss does not use (nothing else accumulates gradients).

    In a process group the gradients of each rank's batch shard are averaged across the ranks (bucketed
    all-reduce) before they are returned, so every step of every method uses the gradient of the whole batch and
    w, y and α stay identical on all ranks; `sync=False` for a loss that does not depend on the data (a penalty in α
    alone, the same on every rank).
    """
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]
    if sync:
        dist.all_reduce_(grads, "mean")
    return grads


def set_grads(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for t, g in zip(tensors, grads, strict=True):
        t.grad = g


def arch_step(problem: Problem, state: SearchState, grads: list[torch.Tensor]) -> None:
    """Update α with `grads` (+ the penalty's gradient), then the problem's post-step (e.g. proximal ℓ1).

    A problem with an `importance` list (one tensor per α) accumulates |α ⊙ grads| into it first."""
    importance = getattr(problem, "importance", None)
    if importance is not None:  # Σ |α ⊙ g| of the data gradient (`search.score: grad`), on the device
        with torch.no_grad():
            torch._foreach_add_(importance, torch._foreach_abs(torch._foreach_mul(grads, problem.arch)))
    penalty = problem.arch_penalty()
    if penalty is not None:
        extra = grads_of(penalty, problem.arch, sync=False)  # α is the same on every rank
        with torch.no_grad():
            torch._foreach_add_(grads, extra)
    set_grads(problem.arch, grads)
    state.optim_arch.step()
    problem.after_arch_step(state.optim_arch.lr_tensor())


def prox_l1_(alphas: list[torch.Tensor], threshold: torch.Tensor | float | list[torch.Tensor]) -> None:
    """Soft-threshold in place: α ← sign(α) · max(|α| − threshold, 0) (the proximal step of threshold·‖α‖₁).

    `threshold` is one number (a float or a 0-d device tensor) or one tensor per α (a threshold per entry)."""
    if not alphas:
        return
    with torch.no_grad():
        signs = torch._foreach_sign(alphas)
        mags = torch._foreach_abs(alphas)
        if isinstance(threshold, list):
            torch._foreach_sub_(mags, threshold)
        elif isinstance(threshold, torch.Tensor):
            torch._foreach_add_(mags, threshold, alpha=-1)  # a 0-d device tensor: no host sync
        else:
            torch._foreach_sub_(mags, threshold)
        torch._foreach_clamp_min_(mags, 0.0)
        torch._foreach_mul_(mags, signs)
        torch._foreach_copy_(alphas, mags)


SearchMethod = MethodInfo  # a search algorithm's registry record (kind "search")


def register_search(name: str, *, two_nets: bool, data: str, passes: int, source: str, description: str):
    """Decorator registering `step(problem, state, batch_t, batch_v)` as search method `name`."""
    if data not in ("split", "whole"):
        raise InputError(f"data must be 'split' or 'whole', got {data!r}")
    return register_method(name, kind="search", source=source, description=description, has_alpha=True,
                           supports_l1=True, two_nets=two_nets, data=data, passes=passes)


def get_search(name: str) -> MethodInfo:
    """The registered search algorithm `name`; unknown names list the choices."""
    return get_method(name, "search")


def list_searches() -> list[str]:
    return sorted(list_methods("search"))
