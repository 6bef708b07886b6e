"""MiLeNAS (He et al. 2020, eq. 3): first-order mixed-level; RARTS reduces to it when y ≡ w."""

from __future__ import annotations

import torch

from .base import Problem, SearchState, arch_step, grads_of, register_search, set_grads


def milenas_step(problem: Problem, state: SearchState, batch_t, batch_v) -> None:
    w = state.w_list
    set_grads(w, grads_of(problem.loss(state.w, state.w_buffers, batch_t, track="t"), w))
    state.step_weights("w")
    grads = grads_of(problem.loss(state.w, state.scratch_buffers, batch_t), problem.arch)
    g_v = grads_of(problem.loss(state.w, state.scratch_buffers, batch_v, track="v"), problem.arch)
    with torch.no_grad():
        torch._foreach_add_(grads, g_v, alpha=state.lam)
    arch_step(problem, state, grads)


register_search("milenas", two_nets=False, data="split", passes=3, source="MiLeNAS, first order",
                description="w ← w − η∇_wL_t(w); α ← α − η_α(∇_αL_t(w) + λ∇_αL_v(w)) at the new w")(milenas_step)
