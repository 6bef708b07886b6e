"""Joint training: one net on the whole training set, w and α in one step (what Network Slimming does)."""

from __future__ import annotations

from .base import Problem, SearchState, arch_step, grads_of, register_search, set_grads


def joint_step(problem: Problem, state: SearchState, batch, _unused=None) -> None:
    w, arch = state.w_list, problem.arch
    g = grads_of(problem.loss(state.w, state.w_buffers, batch, track="t"), w + arch)
    set_grads(w, g[: len(w)])
    state.step_weights("w")
    arch_step(problem, state, g[len(w):])


register_search("joint", two_nets=False, data="whole", passes=1, source="Network Slimming style",
                description="(w, α) ← (w, α) − η∇L(w, α) on batches of the whole training set")(joint_step)
