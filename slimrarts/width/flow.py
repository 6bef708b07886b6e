"""What the one traced forward does not show, and what that means for the channels around it: control flow the
trace did not take, and parameters shared between modules.

The channel groups come from one forward pass in eval mode (`trace.build_graph`). A module whose forward that pass
did not take is not in the graph, so removal would not cut it:

- a module with parameters that ran in neither that pass nor a training-mode pass (`trace.training_calls`) sits on a
  branch the trace did not take (`a(x) if x.mean() > .3 else b(x)`): *untraced*. What feeds it and what it feeds
  cannot be known, so every group that could (one with a layer inside the nearest module whose forward did run, or
  whose channels enter or leave that module) is left unpruned, and `guard` stops a run at the module's first call:
  the search's costs and the removal check describe the traced path only;
- a module that ran but is not in the graph (it runs in training mode only, like GoogLeNet's auxiliary heads, or its
  output is not used) is *off the graph*: the groups whose channels it reads or writes are left unpruned (found by
  following its input and output tensors to the graph's nodes; where that fails, as for an untraced module).

A parameter held by two modules (`model.c3.weight = model.c1.weight`) is one tensor in the graph's two places; a
cut rebuilds it for one module only and the two come back as separate parameters of different widths. Every group
that would cut a module holding such a parameter is left unpruned (`tied_parameters`): untying them lets them be
pruned. So is one that a forward reads outside the module holding it (`F.conv2d(x, self.c1.weight)` in the
model's forward, seen by the trace's `Calls.outside`): a cut would change its shape there as well.

`Gaps.reason(...)` gives why a group is left unpruned; `find_groups` lists such groups as `Skipped`, `attach_gates`
warns naming the modules and parameters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable
from typing import Literal

import torch.nn as nn

from ..errors import InputError
from .norms import FROZEN_NORMS
from .trace import Calls

__all__ = ["Gaps", "Unseen", "UntracedCallError", "find_unseen", "gaps", "guard", "has_state", "matches",
           "tied_parameters"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, *FROZEN_NORMS)  # state in buffers too


class UntracedCallError(InputError):
    """A module that did not run in the traced forward was called during the search or fine-tuning."""


def has_state(module: nn.Module) -> bool:
    """Whether the module holds parameters (or, a norm, running statistics) of its own: what a channel cut changes."""
    if any(p is not None for p in module._parameters.values()):
        return True
    return isinstance(module, _NORMS) and any(b is not None for b in module._buffers.values())


@dataclasses.dataclass
class Unseen:
    """A module with parameters that the traced graph does not hold, and which graph nodes may touch its channels.

    kind "untraced": it did not run in the trace (nor in training mode); "training_only": it runs in training mode
    only; "unused": it ran, but its output reaches no output of the model. `nodes` are the graph nodes whose channels
    it reads or writes; with `scope` set (the nearest module whose forward ran, "" the model) that was not enough to
    know, and every node inside that module or on its inputs and outputs counts.
    """

    name: str
    kind: Literal["untraced", "training_only", "unused"]
    nodes: set = dataclasses.field(default_factory=set)
    scope: str | None = None

    def touches(self, nodes: Iterable, names: dict) -> bool:
        """Whether a group made of graph `nodes` may read or write this module's channels."""
        for node in nodes:
            if node in self.nodes:
                return True
            if self.scope is not None and isinstance(node.module, nn.Module) and node.module in names:
                name = names[node.module]
                if self.scope == "" or name == self.scope or name.startswith(self.scope + "."):
                    return True
        return False

    def reason(self) -> str:
        where = f"{self.scope}'s forward" if self.scope else "the model's forward"
        if self.kind == "untraced":
            return (f"{self.name} has parameters but did not run in the traced forward (a branch of {where} that the "
                    "trace did not take): it may read or write these channels, so they are not pruned; make the "
                    "branch static to prune them")
        if self.kind == "training_only":
            return (f"{self.name} runs in training mode only, outside the traced (eval-mode) graph, and reads or "
                    "writes these channels, so they are not pruned")
        return (f"{self.name} runs in the traced forward but its output is not used, so it is not in the graph; it "
                "reads these channels, so they are not pruned")


def _parent(name: str) -> str | None:
    return None if name == "" else name.rpartition(".")[0]


def _walk_back(fns: Iterable, found: Callable[[object], list | None]) -> list:
    """From autograd nodes (`grad_fn`s) back through their inputs, to the first nodes on every path for which
    `found(fn)` gives a list: those lists, joined. Paths that end in a leaf (the input, a parameter) give nothing."""
    out, stack, seen = [], [fn for fn in fns if fn is not None], set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        hit = found(fn)
        if hit is not None:
            out += hit
            continue
        stack += [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
    return out


def find_unseen(model: nn.Module, dg, traced: Calls | None, trained: Calls | None) -> list[Unseen]:
    """The modules with parameters that `dg` (built from the pass `traced`) does not hold, and what they may touch.

    `trained` is the training-mode pass (`trace.training_calls`; None when it failed: then a module that runs only in
    training counts as untraced). Tensors are followed back through the autograd graph: in the traced pass to the
    graph's nodes, in the training pass to the nearest module outputs (the layers that feed a module), whose nodes in
    the traced pass are then looked up.
    """
    if traced is None:  # a graph not made by `trace.build_graph`: nothing is known about what ran
        return []
    names = {m: n for n, m in model.named_modules()}
    modules = {n: m for m, n in names.items()}
    in_graph = {id(k) for k in dg.module2node}
    owners = {id(p): m for m in names for p in m._parameters.values() if p is not None}
    in_graph |= {id(owners[id(k)]) for k in dg.module2node if id(k) in owners}
    node_of = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    trained = trained if trained is not None else Calls()

    def graph_nodes(fns: Iterable) -> set:
        """The graph nodes of the traced pass that tensors with these grad_fns are made from (the nearest ones)."""
        return set(_walk_back(fns, lambda fn: [node_of[fn]] if fn in node_of else None))

    def ran_in_trace(name: str | None) -> str:
        """The nearest module at or above `name` whose forward ran in the trace ("" the model)."""
        while name and not traced.ran(modules[name]):
            name = _parent(name)
        return name or ""

    def scoped(name: str, kind) -> Unseen:
        scope = ran_in_trace(_parent(name))
        module = modules[scope]
        return Unseen(name, kind, graph_nodes(traced.inputs.get(module, []) + traced.outputs.get(module, [])), scope)

    made_by: dict = {}  # training pass: grad_fn → the modules whose output it made
    for m, ts in trained.outputs.items():
        for t in ts:
            if t.grad_fn is not None and m is not model:
                made_by.setdefault(t.grad_fn, []).append(m)

    def feeders(module: nn.Module, skip: set) -> list[nn.Module]:
        """Training pass: the nearest modules (not in `skip`) whose outputs `module`'s inputs are made from."""
        def found(fn):
            mods = [m for m in made_by.get(fn, []) if m not in skip]
            return mods or None
        return _walk_back([t.grad_fn for t in trained.inputs.get(module, [])], found)

    readers: dict = {}  # training pass: module → the modules that feed it (filled at the first need)

    def training_only(name: str) -> Unseen:
        root = name  # the outermost module around it that did not run in the trace
        while _parent(root) not in (None, "") and not traced.ran(modules[_parent(root)]):
            root = _parent(root)
        inside = {m for n, m in modules.items() if n == root or n.startswith(root + ".")}
        if not readers:
            readers.update({m: feeders(m, set(m.modules())) for m in trained.outputs if m is not model})
        fed_by = feeders(modules[root], inside)
        reads = [m for m, mods in readers.items() if m not in inside and inside & set(mods)]
        if not all(traced.ran(m) for m in fed_by + reads):
            return scoped(root, "training_only")  # next to another module the trace did not see: not followed
        fns = [fn for m in fed_by for fn in traced.outputs[m]] + [fn for m in reads for fn in traced.inputs[m]]
        return Unseen(root, "training_only", graph_nodes(fns))

    out: list[Unseen] = []
    roots: set[str] = set()
    for name, m in modules.items():
        if not has_state(m) or id(m) in in_graph:
            continue
        if traced.ran(m):
            out.append(Unseen(name, "unused", graph_nodes(traced.inputs.get(m, []))))
        elif trained.ran(m):
            entry = training_only(name)
            if entry.name not in roots:
                roots.add(entry.name)
                out.append(entry)
        else:
            out.append(scoped(name, "untraced"))
    return out


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters held by more than one module, by name (`named_parameters`' name), with every `module.attr` holding
    it. A module registered under two names is one module: it holds nothing twice."""
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{name}.{attr}" if name else attr)
    first = {id(p): n for n, p in model.named_parameters()}
    return {first[i]: hs for i, hs in holders.items() if len(hs) > 1 and i in first}


@dataclasses.dataclass
class Gaps:
    """What the trace of a model does not show: modules it did not see (`unseen`), parameters held by several
    modules (`tied`, name → holders), and the groups left unpruned for either (`skipped`, group name → "tied" or
    "unseen")."""

    unseen: list[Unseen] = dataclasses.field(default_factory=list)
    tied: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    # parameters a forward reads outside their module: name → where ("the model's forward (conv2d)")
    outside: dict[str, str] = dataclasses.field(default_factory=dict)
    _holders: dict = dataclasses.field(default_factory=dict, repr=False)  # module → the tied parameter it holds
    _readers: dict = dataclasses.field(default_factory=dict, repr=False)  # module → its parameter read outside it

    @classmethod
    def of(cls, model: nn.Module, unseen: list[Unseen], traced: Calls | None = None) -> Gaps:
        tied = tied_parameters(model)
        holders = {model.get_submodule(h.rpartition(".")[0]): p for p, hs in tied.items() for h in hs}
        names = {m: n for n, m in model.named_modules()}
        pnames = {id(p): n for n, p in model.named_parameters()}
        owners = {id(p): m for m in names for p in m._parameters.values() if p is not None}
        outside, readers = {}, {}
        for param, (user, func) in (traced.outside.items() if traced is not None else ()):
            if id(param) in pnames and id(param) in owners:
                where = f"{names[user]}'s forward" if names.get(user) else "the model's forward"
                outside[pnames[id(param)]] = f"{where} ({func})"
                readers[owners[id(param)]] = pnames[id(param)]
        return cls(unseen, tied, {}, outside, holders, readers)

    @property
    def untraced(self) -> list[str]:
        """The modules with parameters that ran neither in the trace nor in training mode."""
        return [u.name for u in self.unseen if u.kind == "untraced"]

    def reason(self, group: str, nodes: Iterable, names: dict) -> str | None:
        """Why the group `group`, made of graph `nodes`, is left unpruned (None: nothing here stops it); recorded."""
        nodes = list(nodes)
        for node in nodes:
            param = self._holders.get(node.module) if isinstance(node.module, nn.Module) else None
            if param is not None:
                self.skipped[group] = "tied"
                return (f"{param} is one parameter held by {' and '.join(self.tied[param])} (tied weights): cutting "
                        "these channels would give each its own copy, of another width; untie them (a Parameter for "
                        "each module) to prune these channels")
            param = self._readers.get(node.module) if isinstance(node.module, nn.Module) else None
            if param is not None:
                self.skipped[group] = "tied"
                owner = param.rpartition(".")[0] or "the model"
                return (f"{param} is also read outside {owner}, in {self.outside[param]}: cutting these channels "
                        f"would change its shape there too, which the cut cannot follow; call the module ({owner}(x)) "
                        "or give that use a Parameter of its own to prune these channels")
        hits = [u for u in self.unseen if u.touches(nodes, names)]
        if not hits:
            return None
        self.skipped[group] = "unseen"
        more = (f" (and {len(hits) - 1} more: {', '.join(u.name for u in hits[1:4])}"
                f"{', ...' if len(hits) > 4 else ''})") if len(hits) > 1 else ""
        return hits[0].reason() + more


_GAPS_ATTR = "_slimrarts_gaps"


def gaps(dg) -> Gaps:
    """What `find_groups` found the graph `dg` does not show (empty for a graph it did not check)."""
    found = getattr(dg, _GAPS_ATTR, None) if dg is not None else None
    return found if found is not None else Gaps()


def set_gaps(dg, found: Gaps) -> None:
    setattr(dg, _GAPS_ATTR, found)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` or a module above it matches one of the globs."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))


def guard(model: nn.Module, untraced: Iterable[str], exclude: Iterable[str] = ()) -> list:
    """Make each `untraced` module (except those matching an `exclude` glob, or under one) raise `UntracedCallError`
    at its first call; returns the hook handles (remove them to let it run)."""
    exclude = list(exclude)
    handles = []
    for name in untraced:
        if matches(name, exclude):
            continue

        def stop(_module, _args, name=name):
            raise UntracedCallError(
                f"module {name!r} was called, but it did not run in the one forward slimrarts traced to find the "
                "channel groups: the model's forward has data-dependent control flow (a branch on the input's "
                "values, its batch size or a setting) that the traced forward did not take. The channels around it "
                "are left unpruned, but the search's costs and the removal check describe the traced path only. "
                "Make the branch static (the same layers for every input), or add "
                f"{name!r} to prune.exclude to let it run")

        handles.append(model.get_submodule(name).register_forward_pre_hook(stop))
    return handles
