"""The solvable bilevel model of the RARTS paper (§III-D), solved by the same search code that trains networks.

L_v(w, α) = αw − 2α + 1 and L_t(w, α) = w² − 2αw + α². The bilevel minimiser is (w, α) = (1, 1); first-order
DARTS and MiLeNAS settle at the spurious point (2, 2); RARTS settles at the equilibrium of eq. (13)–(15):
(ᾱ, w̄, ȳ) = (4βλ, 4βλ − 2β, 4βλ − 2β − 4λ) / (4βλ − β − 2λ).
"""

from __future__ import annotations

import dataclasses

import torch

from .engine.optim import SGD
from .errors import InputError
from .search.base import SearchState, get_search

__all__ = ["ToyResult", "solve", "rarts_equilibrium"]


class _ToyProblem:
    """The two quadratic losses; a 'batch' says which: 't', 'v', or 'tv' (their sum, the whole data)."""

    def __init__(self, alpha0: float):
        self.arch = [torch.tensor(float(alpha0), dtype=torch.float64, requires_grad=True)]

    def loss(self, params, buffers, batch, track=None) -> torch.Tensor:
        a, w = self.arch[0], params["w"]
        loss_v = a * w - 2 * a + 1
        loss_t = w * w - 2 * a * w + a * a
        return {"t": loss_t, "v": loss_v, "tv": loss_t + loss_v}[batch]

    def arch_penalty(self):
        return None

    def after_arch_step(self, lr) -> None:
        return None


@dataclasses.dataclass
class ToyResult:
    """Final (α, w, y) and the trajectory, one row (α, w, y) per iteration including the start."""

    alpha: float
    w: float
    y: float | None
    trajectory: torch.Tensor


def rarts_equilibrium(lam: float, beta: float) -> tuple[float, float, float]:
    """(ᾱ, w̄, ȳ) solving eq. (13)–(15)."""
    d = 4 * beta * lam - beta - 2 * lam
    if d == 0:
        raise InputError(f"no unique equilibrium for lam={lam}, beta={beta} (4βλ − β − 2λ = 0)")
    return 4 * beta * lam / d, (4 * beta * lam - 2 * beta) / d, (4 * beta * lam - 2 * beta - 4 * lam) / d


def solve(method: str = "rarts", *, lam: float = 10.0, beta: float = 10.0, lr: float = 0.01, steps: int = 5000,
          init: tuple[float, float, float] = (2.0, -2.0, 0.0)) -> ToyResult:
    """Run `steps` iterations of a registered search method on the toy with plain SGD at `lr` for every variable.

    `init` is (α0, w0, y0); y is used only by methods with two weight copies.
    """
    spec = get_search(method)
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    alpha0, w0, y0 = init
    problem = _ToyProblem(alpha0)
    w = {"w": torch.tensor(float(w0), dtype=torch.float64, requires_grad=True)}
    state = SearchState(w=w, w_buffers={}, opt_w=SGD(list(w.values()), lr=lr), optim_arch=SGD(problem.arch, lr=lr),
                        lam=lam, beta=beta)
    if spec.two_nets:
        state.y = {"w": torch.tensor(float(y0), dtype=torch.float64, requires_grad=True)}
        state.y_buffers = {}
        state.opt_y = SGD(list(state.y.values()), lr=lr)

    def row() -> list[float]:
        yv = state.y["w"].item() if state.y is not None else float("nan")
        return [problem.arch[0].item(), state.w["w"].item(), yv]

    rows = [row()]
    for _ in range(steps):
        spec.step(problem, state, *(("t", "v") if spec.data == "split" else ("tv", None)))
        rows.append(row())
    traj = torch.tensor(rows, dtype=torch.float64)
    final = rows[-1]
    return ToyResult(alpha=final[0], w=final[1], y=final[2] if state.y is not None else None, trajectory=traj)
