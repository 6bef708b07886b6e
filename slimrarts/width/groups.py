"""Find the prunable channel groups of a CNN and where each group's gate α must sit.

torch-pruning's DependencyGraph gives the groups: channels that must be removed together. For each group this
module decides the gate sites: the outputs of the group's last normalisation layers (conv → BN → α → act), or of a
producer conv when no norm follows it. A group is accepted only if, with its α set to zero, every layer that reads
the group's channels reads zeros; that is what makes removal exact. The check follows the data flow: gated outputs
are zero; an add or concat is zero when all its inputs are; a product when one of them is; a zero-preserving
activation, pooling or reshape passes zeros on; anything else (a norm not gated, a sigmoid, a conv with bias) does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Iterator, Literal

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency import graph as _tp_graph

__all__ = ["GateSite", "ChannelGroup", "Skipped", "SCOPES", "find_groups"]

SCOPES = ("internal", "branch-input", "coupled")
Scope = Literal["internal", "branch-input", "coupled"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_JOINT_NORMS = (nn.GroupNorm, nn.LayerNorm)
# grad_fn names (without the trailing version digit) of ops with f(0) = 0, applied per channel
_ZERO_PRESERVING = (
    "Relu", "Hardtanh", "Silu", "Gelu", "Hardswish", "LeakyRelu", "Elu", "Mish", "Tanh", "Threshold", "Prelu",
    "Mean", "Sum", "AvgPool2D", "AvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool1D", "MaxPool2DWithIndices",
    "AdaptiveMaxPool2D", "View", "Reshape", "Unsafe", "Clone", "Flatten", "NativeDropout", "Squeeze", "Unsqueeze",
    "Permute", "Transpose", "Expand", "Contiguous", "Alias", "ToCopy", "Neg", "Div", "MulScalar",
)
_MERGE_ALL = frozenset({"Add", "Sub", "Cat", "Stack"})  # matched exactly: "Addmm" (a Linear) is not an add


@dataclasses.dataclass(frozen=True)
class GateSite:
    """Where a gate multiplies its channels: the output of `module`, or the input of its `act` child."""

    module: str
    where: Literal["output", "act_input"]
    fold: Literal["norm", "producer"]  # fold α into a norm's affine parameters or a producer's output rows
    dim: int = 1  # the channel dimension of the gated tensor: -1 for nn.Linear (features last, e.g. NHWC blocks)


@dataclasses.dataclass
class ChannelGroup:
    """A set of channels that share one α vector and are removed together."""

    name: str
    scope: Scope
    size: int
    sites: list[GateSite]
    root: str  # module whose out-channels index the group (branch-input: the entrance norm)
    members: list[str]  # every layer whose width changes with this group
    consumers: list[str] = dataclasses.field(default_factory=list)  # branch-input: layers whose inputs shrink


@dataclasses.dataclass
class Skipped:
    """A group (or the whole model) that gets no gate, and why."""

    name: str
    reason: str


def _op_name(node) -> str:
    fn = getattr(node, "grad_fn", None)
    if fn is None:
        return ""
    name = fn.name()
    return name[:-1] if name and name[-1].isdigit() else name


def _is_merge(node) -> bool:
    return _op_name(node).removesuffix("Backward") in _MERGE_ALL


def _is_depthwise(module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1


class _GroupView:
    """One torch-pruning group seen as a data-flow graph over its channel space."""

    def __init__(self, group, names: dict):
        self.group, self.names = group, names
        self.handler: dict = {}
        for item in group.items:
            node = item.dep.target
            kind = "in" if "in_channels" in item.dep.handler.__name__ else "out"
            self.handler.setdefault(node, set()).add(kind)
        root = group.items[0].dep.target
        self.root = root
        self.size = len(group.items[0].idxs)
        self.items = group.items

    def name(self, node) -> str:
        if node.module is not None and node.module in self.names:
            return self.names[node.module]
        return node.name

    def kind(self, node) -> str:
        """producer | consumer | depthwise | norm | joint_norm | elementwise | reshape | output | other."""
        kinds = self.handler.get(node, set())
        m = node.module
        if node.type == ops.OPTYPE.OUTPUT:
            return "output"
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            if _is_depthwise(m):
                return "depthwise"
            return "consumer" if kinds == {"in"} else "producer"
        if isinstance(m, _NORMS):
            return "norm"
        if isinstance(m, _JOINT_NORMS) or node.type in (ops.OPTYPE.GN, ops.OPTYPE.LN):
            return "joint_norm"
        if node.type == ops.OPTYPE.ELEMENTWISE:
            return "elementwise"
        if node.type == ops.OPTYPE.RESHAPE:
            return "reshape"
        if node.type == ops.OPTYPE.CONCAT:
            return "concat"
        return "other"

    def reads(self, node) -> bool:
        """Whether `node` mixes this group's channels into its outputs (a conv or linear reading them).

        Such a layer may also produce channels of the same group (RepVGG's blocks are tied by identity BNs): it is a
        producer and a consumer at once.
        """
        m = node.module
        return (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not _is_depthwise(m)
                and "in" in self.handler.get(node, ()))

    def activation_inputs(self, node) -> list:
        """`node`'s inputs in this group that carry activations (not those made from parameters alone, such as a
        Linear's transposed weight)."""
        return [n for n in node.inputs if n in self.handler and not (self.kind(n) == "elementwise" and not n.inputs)]

    def successors(self, node) -> list:
        """Data-flow successors that carry this group's channels (layers reading them end the walk)."""
        if self.reads(node):
            return []
        return [n for n in node.outputs if n in self.handler]

    def downstream(self, node) -> set:
        seen, stack = set(), [n for n in node.outputs if n in self.handler]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(self.successors(n))
        return seen

    def is_coupled(self) -> bool:
        return any(self.kind(n) in ("elementwise", "concat") and _is_merge(n) for n in self.handler)

    def consumers_read_zero(self, gated: set) -> tuple[bool, str]:
        """Whether, with the gated nodes' outputs zero, every consumer of the channels reads zero."""
        memo: dict = {}

        def zero(node) -> bool:
            if node in memo:
                return memo[node]
            memo[node] = False  # cycle guard
            if node in gated:
                memo[node] = True
                return True
            kind = self.kind(node)
            ins = [n for n in node.inputs if n in self.handler]
            if kind in ("producer", "norm", "joint_norm", "output", "other"):
                result = False
            elif kind == "depthwise":
                result = bool(ins) and node.module.bias is None and all(zero(n) for n in ins)
            elif kind == "reshape":
                result = bool(ins) and all(zero(n) for n in ins)
            elif kind == "concat":
                result = bool(ins) and all(zero(n) for n in ins)
            else:
                op = _op_name(node)
                if _is_merge(node):
                    result = len(ins) == len(node.inputs) and all(zero(n) for n in ins)
                elif op in ("AddmmBackward", "MmBackward"):
                    # a Linear applied to channels-last activations, traced as its matmul: it contracts over the
                    # group's channels, so it reads zeros when its activation input is zero
                    acts = self.activation_inputs(node)
                    result = bool(acts) and all(zero(n) for n in acts)
                elif op.startswith("Mul"):
                    result = any(zero(n) for n in ins)
                elif op.startswith(_ZERO_PRESERVING):
                    result = bool(ins) and all(zero(n) for n in ins)
                else:
                    result = False
            memo[node] = result
            return result

        for node in self.handler:
            if self.reads(node):
                ins = self.activation_inputs(node)
                if not ins or not all(zero(n) for n in ins):
                    return False, self.name(node)
        return True, ""


def _site_for(view: _GroupView, node) -> GateSite:
    m = node.module
    name = view.name(node)
    if isinstance(m, _NORMS):
        act = getattr(m, "act", None)
        where = "act_input" if isinstance(act, nn.Module) else "output"
        return GateSite(name, where, "norm")
    return GateSite(name, "output", "producer", dim=-1 if isinstance(m, nn.Linear) else 1)


def _check_unsupported(view: _GroupView) -> str | None:
    for item in view.items:
        node = item.dep.target
        kind = view.kind(node)
        m = node.module
        if kind == "joint_norm":
            return f"{view.name(node)} normalises these channels jointly (GroupNorm/LayerNorm); removal would change the rest"
        if kind in ("concat", "other") or node.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND, ops.OPTYPE.SLICE,
                                                        ops.OPTYPE.CUSTOMIZED, ops.OPTYPE.MHA, ops.OPTYPE.LSTM,
                                                        ops.OPTYPE.EMBED, ops.OPTYPE.PARAMETER, ops.OPTYPE.EXPAND):
            return f"{view.name(node)}: {type(m).__name__ if m is not None else node.name} is not supported yet"
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and (
                not _is_depthwise(m) or isinstance(m, nn.modules.conv._ConvTransposeNd)):
            return f"{view.name(node)} is a grouped convolution (groups={m.groups})"
        if isinstance(m, _NORMS) and not m.affine:
            return f"{view.name(node)} has no affine parameters to fold the gate into"
        if kind not in ("consumer",) and list(item.idxs) != list(range(view.size)):
            return f"{view.name(node)}: channel indices are remapped (concat/split/flatten)"
    return None


def _last_norms(view: _GroupView) -> list:
    norms = [n for n in view.handler if view.kind(n) == "norm"]
    return [n for n in norms if not any(view.kind(d) == "norm" for d in view.downstream(n))]


def _gate_sites(view: _GroupView) -> tuple[list, str | None]:
    """Last norms first; then producers without a norm downstream; then every norm; then every producer."""
    producers = [n for n in view.handler if view.kind(n) in ("producer",)]
    last_norms = _last_norms(view)
    norms = [n for n in view.handler if view.kind(n) == "norm"]
    bare = [p for p in producers if not any(view.kind(d) == "norm" for d in view.downstream(p))]
    reader = ""
    for gated in (last_norms, last_norms + bare, norms + bare, last_norms + producers):
        if not gated:
            continue
        ok, reader = view.consumers_read_zero(set(gated))
        if ok:
            return gated, None
    return [], f"no gate placement zeroes every input of {reader or 'the consumers'}"


def _branch_inputs(view: _GroupView) -> list[tuple]:
    """Entrance norms of a coupled group: norms whose outputs only reach consumers through per-channel ops."""
    out = []
    for node in view.handler:
        if view.kind(node) != "norm":
            continue
        down = view.downstream(node)
        kinds = {view.kind(d) for d in down}
        if not kinds or not kinds <= {"elementwise", "reshape", "consumer"}:
            continue
        if not all(view.kind(d) != "elementwise" or _op_name(d).startswith(_ZERO_PRESERVING) for d in down):
            continue
        consumers = [d for d in down if view.kind(d) == "consumer"]
        if consumers:
            out.append((node, consumers))
    return out


_DIVERGED = ("torch-pruning's dependency search did not converge on this group (a residual that adds into part of "
             "the channels, as in ReXNet, maps indices without end)")


class _Diverged(Exception):
    pass


@contextlib.contextmanager
def _bounded_groups(limit: int) -> Iterator[None]:
    """Make DependencyGraph.get_pruning_group raise `_Diverged` once a group grows past `limit` items.

    torch-pruning's traversal revisits a node whenever it arrives with new indices; with partial-channel residuals the
    indices keep changing and the group grows without end. A real group has a few items per graph node at most.
    """
    base = _tp_graph.Group

    class Bounded(base):
        def add_dep(self, dep, idxs):
            if len(self) >= limit:
                raise _Diverged
            super().add_dep(dep, idxs)

    _tp_graph.Group = Bounded
    try:
        yield
    finally:
        _tp_graph.Group = base


def _all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> Iterator[tuple[object | None, nn.Module]]:
    """Every pruning group rooted at a conv or linear layer's out-channels, as (group, root); group None if diverged.

    This is DependencyGraph.get_all_groups with a bound on each group's size, so one bad group is skipped instead of
    hanging the search.
    """
    visited: set[nn.Module] = set()
    ignored_all = ignored + list(getattr(dg, "IGNORED_LAYERS_IN_TRACING", []))
    limit = 8 * len(dg.module2node) + 64
    for module in list(dg.module2node):
        if module in visited or any(module is m for m in ignored_all):
            continue
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            with _bounded_groups(limit):
                group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                             list(range(pruner.get_out_channels(module))))
        except _Diverged:
            visited.add(module)
            yield None, module
            continue
        usable = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                usable = usable and not any(dep.target.module is m for m in ignored_all)
        if usable:
            yield group, module


def find_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    scopes: Iterable[str] = ("internal",),
    ignored: Iterable[nn.Module] = (),
) -> tuple[list[ChannelGroup], list[Skipped], tp.DependencyGraph | None]:
    """The gateable channel groups of `model` for the given scopes, the groups skipped with reasons, and the graph."""
    scopes = tuple(scopes)
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"scope {bad[0]!r} is unknown; choose from {', '.join(SCOPES)}")
    if "branch-input" in scopes and "coupled" in scopes:
        raise ValueError("scopes 'branch-input' and 'coupled' gate the same residual channels; choose one of them")
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure means this model cannot be gated
        return [], [Skipped(type(model).__name__, f"dependency tracing failed: {type(err).__name__}: {err}")], None
    finally:
        model.train(was_training)
    groups: list[ChannelGroup] = []
    skipped: list[Skipped] = []
    for group, root in _all_groups(dg, list(ignored)):
        if group is None:
            skipped.append(Skipped(names.get(root, type(root).__name__), _DIVERGED))
            continue
        view = _GroupView(group, names)
        gname = view.name(view.root)
        if any(view.kind(n) == "output" for n in view.handler) or not any(
                view.kind(n) == "consumer" for n in view.handler):
            continue  # the model's outputs (classifier logits): never pruned
        coupled = view.is_coupled()
        members = sorted({view.name(n) for n in view.handler if n.module is not None and n.module in names})
        reason = _check_unsupported(view)
        gated, why = _gate_sites(view) if reason is None else ([], reason)
        # Pre-activation nets: channels read by norms at branch entrances and also by other layers (the residual
        # stream, or a stem feeding a block and its shortcut) are selected per branch, as Network Slimming does.
        if "branch-input" in scopes and (coupled or set(gated) - set(_last_norms(view))):
            entrances = _branch_inputs(view) if list(view.items[0].idxs) == list(range(view.size)) else []
            for norm, consumers in entrances:
                nname = view.name(norm)
                if not norm.module.affine:
                    skipped.append(Skipped(f"input:{nname}", "norm has no affine parameters"))
                    continue
                groups.append(ChannelGroup(
                    name=f"input:{nname}", scope="branch-input", size=norm.module.num_features,
                    sites=[_site_for(view, norm)], root=nname, members=[nname] + [view.name(c) for c in consumers],
                    consumers=[view.name(c) for c in consumers]))
            if entrances:
                continue
        scope = "coupled" if coupled else "internal"
        if scope not in scopes:
            continue
        if why is not None:
            skipped.append(Skipped(gname, why))
            continue
        groups.append(ChannelGroup(name=gname, scope=scope, size=view.size, sites=[_site_for(view, n) for n in gated],
                                   root=gname, members=members))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    groups.sort(key=lambda g: order.get(g.root, len(order)))
    return groups, skipped, dg
