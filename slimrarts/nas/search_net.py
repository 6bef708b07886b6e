"""DARTS' search network: a stack of cells whose 14 edges are mixed operations weighted by softmax(α).

α (`alpha_normal`, `alpha_reduce`, each of shape (edges, operations)) are plain leaf tensors, not registered
parameters or buffers: `named_parameters()` are the weights w only, so `torch.func.functional_call` swaps w (and y)
while every pass reads the same α, which is what the search algorithms in `slimrarts.search` expect. `.to()` moves
α with the module (the same tensor objects, so optimizers keep holding them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from .genotypes import Genotype, derive
from .operations import PRIMITIVES, FactorizedReduce, ReLUConvBN, make_op

__all__ = ["MixedOp", "SearchCell", "SearchNetwork", "num_edges"]


def num_edges(steps: int) -> int:
    """Edges of a cell with `steps` intermediate nodes, each fed by the two inputs and every earlier node."""
    return steps * (steps + 3) // 2


class MixedOp(nn.Module):
    """Σ_k w_k · op_k(x) over the candidate operations of one edge (`none` adds zeros, so it is left out of the sum;
    its weight still takes part in the softmax)."""

    def __init__(self, c: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.c, self.stride = c, stride
        self.ops = nn.ModuleList(make_op(p, c, stride, affine=False, search=True) for p in primitives)
        self._active = [k for k, p in enumerate(primitives) if p != "none"]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for k in self._active:
            term = weights[k] * self.ops[k](x)
            out = term if out is None else out + term
        return out


class SearchCell(nn.Module):
    """A cell: two preprocessed inputs, `steps` nodes each summing mixed edges from all earlier states, and the
    concatenation of the last `multiplier` nodes as output."""

    def __init__(self, steps: int, multiplier: int, c_pp: int, c_p: int, c: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0 = (FactorizedReduce(c_pp, c, affine=False) if reduction_prev
                            else ReLUConvBN(c_pp, c, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and j < 2 else 1, primitives)
                                   for node in range(steps) for j in range(node + 2))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for _ in range(self.steps):
            s = None
            for h in states:
                term = self.edges[e](h, weights[e])
                s = term if s is None else s + term
                e += 1
            states.append(s)
        return torch.cat(states[-self.multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """The DARTS search net: stem, `layers` cells (reductions at 1/3 and 2/3 of the depth), global pool, linear.

    Defaults are DARTS' CIFAR-10 search net (16 channels, 8 cells, 4 nodes). α are initialised as DARTS does,
    1e-3 · N(0, 1), after the weights (from the global RNG).
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4,
                 multiplier: int | None = None, stem_multiplier: int = 3, primitives: Sequence[str] = PRIMITIVES,
                 in_chans: int = 3):
        super().__init__()
        for name, value, low in (("C", C, 2), ("num_classes", num_classes, 1), ("layers", layers, 1),
                                 ("steps", steps, 1), ("stem_multiplier", stem_multiplier, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"SearchNetwork: {name} must be an int >= {low}, got {value!r}")
        if C % 2:
            raise InputError(f"SearchNetwork: C must be even (factorized reductions split it in halves), got {C}")
        multiplier = steps if multiplier is None else multiplier
        if not 1 <= multiplier <= steps:
            raise InputError(f"SearchNetwork: multiplier must be in 1..steps={steps}, got {multiplier}")
        self.primitives = tuple(primitives)
        self.steps, self.multiplier, self.layers = steps, multiplier, layers
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        reductions = {layers // 3, 2 * layers // 3}
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cells.append(SearchCell(steps, multiplier, c_pp, c_p, c_curr, reduction, reduction_prev, self.primitives))
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)
        shape = (num_edges(steps), len(self.primitives))
        self.arch: list[torch.Tensor] = [(1e-3 * torch.randn(shape)).requires_grad_(),
                                         (1e-3 * torch.randn(shape)).requires_grad_()]

    @property
    def alpha_normal(self) -> torch.Tensor:
        return self.arch[0]

    @property
    def alpha_reduce(self) -> torch.Tensor:
        return self.arch[1]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        with torch.no_grad():
            for a in self.arch:  # keep the same leaf tensors (optimizers hold them): swap their data
                a.data = fn(a.data)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = torch.softmax(self.arch[0], dim=-1)
        w_reduce = torch.softmax(self.arch[1], dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> Genotype:
        """The discrete cells of the current α (`derive`)."""
        return derive(self.arch[0], self.arch[1], steps=self.steps, primitives=self.primitives,
                      multiplier=self.multiplier)

    def alpha_softmax(self) -> dict[str, list[list[float]]]:
        """softmax(α) of both cells as nested lists (one host copy)."""
        return {name: torch.softmax(a.detach().float(), dim=-1).cpu().tolist()
                for name, a in (("normal", self.arch[0]), ("reduce", self.arch[1]))}
