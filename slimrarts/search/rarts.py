"""RARTS (Xue, Qi, Xin 2022, eq. 7): three Gauss–Seidel steps on w, y and α; and a two-pass Jacobi variant."""

from __future__ import annotations

import torch

from .base import Problem, SearchState, arch_step, grads_of, register_search, set_grads


def _coupled(grads: list[torch.Tensor], scale: float, mine: list[torch.Tensor], other: list[torch.Tensor],
             beta: float) -> list[torch.Tensor]:
    """scale·grads + β·(mine − other), with foreach ops; the β-term is explicit, never built in the graph."""
    with torch.no_grad():
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if beta:
            torch._foreach_add_(grads, torch._foreach_sub(mine, other), alpha=beta)
    return grads


def _combine(grads_t: list[torch.Tensor], lam: float, grads_v: list[torch.Tensor]) -> list[torch.Tensor]:
    """λ·grads_t + grads_v."""
    with torch.no_grad():
        if lam != 1.0:
            torch._foreach_mul_(grads_t, lam)
        torch._foreach_add_(grads_t, grads_v)
    return grads_t


def rarts_step(problem: Problem, state: SearchState, batch_t, batch_v) -> None:
    w, y = state.w_list, state.y_list
    loss_t = problem.loss(state.w, state.w_buffers, batch_t, track="t")
    set_grads(w, _coupled(grads_of(loss_t, w), state.lam, w, y, state.beta))
    state.step_weights("w")
    loss_v = problem.loss(state.y, state.y_buffers, batch_v, track="v")
    set_grads(y, _coupled(grads_of(loss_v, y), 1.0, y, w, state.beta))
    state.step_weights("y")
    # α at the new w and y; these passes leave the running statistics alone (scratch buffers)
    grads = grads_of(problem.loss(state.w, state.scratch_buffers, batch_t), problem.arch)
    grads_v = grads_of(problem.loss(state.y, state.scratch_buffers, batch_v), problem.arch)
    arch_step(problem, state, _combine(grads, state.lam, grads_v))


register_search("rarts", two_nets=True, data="split", passes=4, source="RARTS eq. (7)",
                description="w ← w − η(λ∇L_t(w) + β(w−y)); y ← y − η(∇L_v(y) + β(y−w)); "
                            "α ← α − η(λ∇_αL_t(w) + ∇_αL_v(y)), each step at the values just updated")(rarts_step)


def rarts_jacobi_step(problem: Problem, state: SearchState, batch_t, batch_v) -> None:
    w, y, arch = state.w_list, state.y_list, problem.arch
    n = len(w)
    loss_t = problem.loss(state.w, state.w_buffers, batch_t, track="t")
    g = grads_of(loss_t, w + arch)
    grads_arch = g[n:]
    set_grads(w, _coupled(g[:n], state.lam, w, y, state.beta))
    state.step_weights("w")
    loss_v = problem.loss(state.y, state.y_buffers, batch_v, track="v")
    g = grads_of(loss_v, y + arch)
    set_grads(y, _coupled(g[:n], 1.0, y, w, state.beta))
    state.step_weights("y")
    arch_step(problem, state, _combine(grads_arch, state.lam, g[n:]))


register_search("rarts-jacobi", two_nets=True, data="split", passes=2,
                source="not the paper's method: a speed option",
                description="as rarts, but the α-gradient comes from the same two passes as the w- and y-steps "
                            "(at the old w and y)")(rarts_jacobi_step)
