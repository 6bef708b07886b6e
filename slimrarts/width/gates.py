"""Learnable per-channel gates α attached to any CNN with forward hooks; the model's code is untouched."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn

from .groups import ChannelGroup, Skipped, find_groups

__all__ = ["Gates", "attach_gates"]


def _scale(x: torch.Tensor, alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    if dim == -1:
        return x * alpha.to(x.dtype)
    return x * alpha.view((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)


class Gates:
    """The α vectors of a gated model, one per channel group, and the hooks that apply them.

    `alphas[i]` is a leaf tensor (requires grad) of length `groups[i].size`, initialised to 1. It lives outside the
    model's parameters, so `model.parameters()` and `torch.func.functional_call` leave it alone.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], skipped: list[Skipped], dg=None,
                 example_input: torch.Tensor | None = None):
        self.model, self.groups, self.skipped, self.dg = model, groups, skipped, dg
        self.example_input = example_input
        device = next(model.parameters()).device
        self.alphas = [torch.ones(g.size, device=device, requires_grad=True) for g in groups]
        self._handles: list = []
        self._override: list[torch.Tensor] | None = None
        modules = dict(model.named_modules())
        for i, group in enumerate(groups):
            for site in group.sites:
                module = modules[site.module]
                if site.where == "act_input":
                    self._handles.append(module.act.register_forward_pre_hook(self._pre_hook(i, site.dim)))
                else:
                    self._handles.append(module.register_forward_hook(self._post_hook(i, site.dim)))

    def _alpha(self, i: int) -> torch.Tensor:
        return self._override[i] if self._override is not None else self.alphas[i]

    def _pre_hook(self, i: int, dim: int):
        def hook(_module, args):
            return (_scale(args[0], self._alpha(i), dim),) + tuple(args[1:])
        return hook

    def _post_hook(self, i: int, dim: int):
        def hook(_module, _args, output):
            return _scale(output, self._alpha(i), dim)
        return hook

    def parameters(self) -> list[torch.Tensor]:
        """The α tensors (the architecture parameters of width search)."""
        return self.alphas

    @property
    def num_channels(self) -> int:
        """Number of gated channels (one per α entry)."""
        return sum(g.size for g in self.groups)

    def flat(self) -> torch.Tensor:
        """All α values in one detached vector, group by group."""
        return torch.cat([a.detach().flatten() for a in self.alphas]) if self.alphas else torch.zeros(0)

    @contextlib.contextmanager
    def using(self, alphas: Iterable[torch.Tensor]):
        """Run the model with other α values (e.g. pruned channels zeroed) inside the block."""
        previous = self._override
        self._override = list(alphas)
        try:
            yield self
        finally:
            self._override = previous

    def masked(self, keep: list[torch.Tensor]):
        """`using` the current α with the channels not kept set to zero."""
        return self.using([a.detach() * k.to(device=a.device, dtype=a.dtype) for a, k in zip(self.alphas, keep)])

    def remove(self) -> None:
        """Remove every hook: the model computes as if ungated again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict:
        return {"alphas": [a.detach().clone() for a in self.alphas]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, s in zip(self.alphas, state["alphas"]):
                a.copy_(s)

    def summary(self) -> list[dict]:
        """One row per group: name, scope, size and where its gates sit."""
        return [{"name": g.name, "scope": g.scope, "size": g.size, "sites": [s.module for s in g.sites]}
                for g in self.groups]


def attach_gates(model: nn.Module, example_input: torch.Tensor, scope: str | Iterable[str] = "internal",
                 ignored: Iterable[nn.Module] = ()) -> Gates:
    """Find `model`'s channel groups for the scope(s) and attach one α per channel (initialised to 1)."""
    scopes = (scope,) if isinstance(scope, str) else tuple(scope)
    example_input = example_input.to(next(model.parameters()).device)
    groups, skipped, dg = find_groups(model, example_input, scopes, ignored)
    return Gates(model, groups, skipped, dg, example_input)
