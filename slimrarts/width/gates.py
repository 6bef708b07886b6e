"""Learnable per-channel gates α attached to any CNN with forward hooks; the model's code is untouched."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import InputError
from .flow import gaps, guard
from .groups import ChannelGroup, Skipped, find_groups
from .heads import raw_output_modules
from .skipped import warn_gaps, warn_skipped

__all__ = ["strip_hooks", "ungated_copy", "Gates", "attach_gates"]


def _scale(x: torch.Tensor, alpha: torch.Tensor, dim: int = 1, repeat: int = 1) -> torch.Tensor:
    if repeat > 1:
        alpha = alpha.repeat(repeat)  # tiled over the conv groups: channel c gets α[c % len(α)]
    if dim == -1:
        return x * alpha.to(x.dtype)
    return x * alpha.view((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)


class Gates:
    """The α vectors of a gated model, one per channel group, and the hooks that apply them.

    `alphas[i]` is a leaf tensor (requires grad) of length `groups[i].num_alphas` (= `size // repeat`: one entry per
    channel, or per position shared by the conv groups of a grouped convolution), initialised to 1. It lives outside
    the model's parameters, so `model.parameters()` and `torch.func.functional_call` leave it alone.

    `skipped` lists the groups of the asked scopes that could not be gated exactly (coverage gaps, each with its
    reason); `out_of_scope` the groups that only another scope would consider. `gaps` (`flow.Gaps`) says what the
    trace did not show: modules it did not see (`gaps.untraced`: those that did not run) and tied parameters.
    `guards` are the hooks `guard_untraced` put on the untraced modules; they outlive `remove()` (fine-tuning runs
    after the cut) and go with `unguard()`. `outputs` names the submodules the trace ended at (empty: the model's
    output; see `attach_gates`).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], skipped: list[Skipped], dg=None,
                 example_input: torch.Tensor | None = None, outputs: Sequence[str] = ()):
        self.model, self.groups, self.dg = model, groups, dg
        self.outputs = list(outputs)
        self.skipped = [s for s in skipped if s.kind != "out_of_scope"]
        self.out_of_scope = [s for s in skipped if s.kind == "out_of_scope"]
        self.example_input = example_input
        self.scopes: tuple[str, ...] = tuple(sorted({g.scope for g in groups}))  # attach_gates sets the asked ones
        self.gaps = gaps(dg)
        self.guards: list = []
        device = next(model.parameters()).device
        self.alphas = [torch.ones(g.num_alphas, device=device, requires_grad=True) for g in groups]
        self._handles: list = []
        self._override: list[torch.Tensor] | None = None
        modules = dict(model.named_modules())
        for i, group in enumerate(groups):
            for site in group.sites:
                module = modules[site.module]
                if site.where == "act_input":
                    self._handles.append(module.act.register_forward_pre_hook(
                        self._pre_hook(i, site.dim, group.repeat)))
                else:
                    self._handles.append(module.register_forward_hook(self._post_hook(i, site.dim, group.repeat)))

    def _alpha(self, i: int) -> torch.Tensor:
        return self._override[i] if self._override is not None else self.alphas[i]

    def _pre_hook(self, i: int, dim: int, repeat: int):
        def hook(_module, args):
            return (_scale(args[0], self._alpha(i), dim, repeat),) + tuple(args[1:])
        return hook

    def _post_hook(self, i: int, dim: int, repeat: int):
        def hook(_module, _args, output):
            return _scale(output, self._alpha(i), dim, repeat)
        return hook

    def parameters(self) -> list[torch.Tensor]:
        """The α tensors (the architecture parameters of width search)."""
        return self.alphas

    @property
    def num_channels(self) -> int:
        """Number of gated channels (an α entry gates `repeat` of them)."""
        return sum(g.size for g in self.groups)

    @property
    def repeats(self) -> list[int]:
        """Channels per α entry of each group, for `select_ratio`, `select_l1` and `pruned_ratio`."""
        return [g.repeat for g in self.groups]

    def entry_scores(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-channel scores (e.g. BN |γ|, length `size`) reduced to one score per α entry: the mean of |score|
        over the conv groups sharing the entry. Scores already of α's length are returned as they are."""
        out = []
        for group, score in zip(self.groups, scores, strict=True):
            score = score.detach().flatten()
            if score.numel() == group.size and group.repeat > 1:
                score = score.abs().view(group.repeat, group.num_alphas).mean(0)
            elif score.numel() != group.num_alphas:
                raise InputError(f"group {group.name!r}: {score.numel()} scores for {group.size} channels "
                                 f"({group.num_alphas} α entries)")
            out.append(score)
        return out

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
        return self.using([a.detach() * k.to(device=a.device, dtype=a.dtype)
                           for a, k in zip(self.alphas, keep, strict=True)])

    def remove(self) -> None:
        """Remove every gate hook: the model computes as if ungated again (the `guards` stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def guard_untraced(self, exclude: Iterable[str] = ()) -> None:
        """Make every module that did not run in the trace (`gaps.untraced`) raise `flow.UntracedCallError` at its
        first call, except those matching (or under a module matching) an `exclude` glob: `prune()` keeps this on
        through the search and fine-tuning, and takes it off (`unguard`) before it returns the slim model."""
        self.guards += guard(self.model, self.gaps.untraced, exclude)

    def unguard(self) -> None:
        """Remove the hooks of `guard_untraced`."""
        for h in self.guards:
            h.remove()
        self.guards.clear()

    def state_dict(self) -> dict:
        return {"alphas": [a.detach().clone() for a in self.alphas]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, s in zip(self.alphas, state["alphas"], strict=True):
                a.copy_(s)

    def summary(self) -> list[dict]:
        """One row per group: name, scope, size and where its gates sit."""
        return [{"name": g.name, "scope": g.scope, "size": g.size, "repeat": g.repeat,
                 "sites": [s.module for s in g.sites]} for g in self.groups]


def attach_gates(model: nn.Module, example_input: torch.Tensor, scope: str | Iterable[str] = "internal",
                 ignored: Iterable[nn.Module] = (), warn: bool = True, outputs: Sequence[str] | None = None) -> Gates:
    """Find `model`'s channel groups for the scope(s) and attach one α per channel (initialised to 1).

    When some groups of the asked scopes cannot be gated, one `CoverageWarning` says how many channels were left out
    and what share of the model's MACs the layers reading or writing them hold (`warn=False` leaves it out); the
    reasons are in `gates.skipped`.

    `outputs` names submodules whose outputs end the trace in place of the model's output: their channels are never
    cut, and what runs after them only (post-processing) is not traced. None (the default) takes a torchvision
    detection model's raw prediction heads (`heads.raw_output_modules`: what its boxes are decoded from, before
    thresholds and non-maximum suppression) and the model's own output for any other model; () always the model's.
    A detection model in eval mode takes a batch tensor [N, 3, H, W] as `example_input`.
    """
    scopes = (scope,) if isinstance(scope, str) else tuple(scope)
    example_input = example_input.to(next(model.parameters()).device)
    outputs = raw_output_modules(model) if outputs is None else list(outputs)
    groups, skipped, dg = find_groups(model, example_input, scopes, ignored, outputs=outputs)
    gates = Gates(model, groups, skipped, dg, example_input, outputs)
    gates.scopes = scopes
    if warn and gates.skipped:
        warn_skipped(gates, stacklevel=2)
    if warn:
        warn_gaps(gates, stacklevel=2)
    return gates


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")  # torch.nn.Module's forward-hook tables (keyed by handle id)


def ungated_copy(gates: Gates) -> nn.Module:
    """A deep copy of the gated model without the gates' hooks and guards (any other hook kept): the dense network as
    the user built it. The copy's hooks are found by the ids of the gates' handles in torch's per-module hook tables."""
    model = copy.deepcopy(gates.model)
    ids = {h.id for h in gates._handles + gates.guards}
    for m in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            for k in [k for k in (hooks or {}) if k in ids]:
                del hooks[k]
    return model


def strip_hooks(module: nn.Module) -> None:
    """Remove every forward hook and pre-hook from `module` and its submodules (a copy of a layer timed alone)."""
    for m in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks:
                hooks.clear()
