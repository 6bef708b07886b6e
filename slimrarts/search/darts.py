"""DARTS (Liu, Simonyan, Yang 2019): first order, and second order with the finite-difference Hessian product."""

from __future__ import annotations

import torch

from .base import Problem, SearchState, arch_step, grads_of, register_search, set_grads


def darts1_step(problem: Problem, state: SearchState, batch_t, batch_v) -> None:
    w = state.w_list
    set_grads(w, grads_of(problem.loss(state.w, state.w_buffers, batch_t, track="t"), w))
    state.step_weights("w")
    loss_v = problem.loss(state.w, state.scratch_buffers, batch_v, track="v")
    arch_step(problem, state, grads_of(loss_v, problem.arch))


register_search("darts1", two_nets=False, data="split", passes=2, source="DARTS, first order",
                description="w ← w − η∇_wL_t(w); α ← α − η_α∇_αL_v(w) at the new w")(darts1_step)


def _unrolled(state: SearchState, grads: list[torch.Tensor], xi: torch.Tensor) -> list[torch.Tensor]:
    """w' = w − ξ(∇L_t + wd·w + momentum·buf): one virtual step of the weights' own SGD, as DARTS does."""
    group = state.opt_w.param_groups[0]
    w = state.w_list
    step = list(grads)
    bufs = [state.opt_w.state[p].get("momentum_buffer") for p in w]
    with torch.no_grad():
        if group.get("weight_decay"):
            step = torch._foreach_add(step, w, alpha=group["weight_decay"])
        if group.get("momentum") and all(b is not None for b in bufs):
            step = torch._foreach_add(step, bufs, alpha=group["momentum"])
        virtual = torch._foreach_sub(w, torch._foreach_mul(step, xi))
    return [v.requires_grad_() for v in virtual]


def darts2_step(problem: Problem, state: SearchState, batch_t, batch_v) -> None:
    names, w, arch = list(state.w), state.w_list, problem.arch
    xi = state.opt_w.lr_tensor() if state.xi is None else torch.full((), state.xi, device=w[0].device)
    scratch = state.scratch_buffers
    g_t = grads_of(problem.loss(state.w, scratch, batch_t), w)
    w_virtual = _unrolled(state, g_t, xi)
    loss_v = problem.loss(dict(zip(names, w_virtual, strict=True)), scratch, batch_v, track="v")
    g = grads_of(loss_v, arch + w_virtual)
    grads_arch, dw = g[: len(arch)], g[len(arch):]
    with torch.no_grad():
        eps = 0.01 / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(dw))).clamp_min(1e-12)
    with torch.no_grad():
        step = torch._foreach_mul(dw, eps)
        w_plus, w_minus = torch._foreach_add(w, step), torch._foreach_sub(w, step)
    g_plus = grads_of(problem.loss(dict(zip(names, w_plus, strict=True)), scratch, batch_t), arch)
    g_minus = grads_of(problem.loss(dict(zip(names, w_minus, strict=True)), scratch, batch_t), arch)
    with torch.no_grad():
        hvp = torch._foreach_sub(g_plus, g_minus)
        torch._foreach_mul_(hvp, xi / (2 * eps))
        torch._foreach_sub_(grads_arch, hvp)
    arch_step(problem, state, grads_arch)
    set_grads(w, grads_of(problem.loss(state.w, state.w_buffers, batch_t, track="t"), w))
    state.step_weights("w")


register_search("darts2", two_nets=False, data="split", passes=5, source="DARTS, second order (unrolled)",
                description="α-gradient at w' = w − ξ∇_wL_t(w): ∇_αL_v(w') − ξ·∇²_{α,w}L_t·∇_{w'}L_v(w'), the "
                            "Hessian product by finite differences with ε = 0.01/‖∇_{w'}L_v‖; then the w-step"
                )(darts2_step)
