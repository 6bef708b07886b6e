"""Find the prunable channel groups of a CNN and where each group's gate α must sit.

torch-pruning's DependencyGraph gives the groups: channels that must be removed together. For each group this
module decides the gate sites: the outputs of the group's last normalisation layers (conv → BN → α → act), or of a
producer conv when no norm follows it. A group is accepted only if, with its α set to zero, every layer that reads
the group's channels reads zeros; that is what makes removal exact. The check follows the data flow: gated outputs
are zero; an add or concat is zero when all its inputs are; a product when one of them is; a zero-preserving
activation, pooling or reshape passes zeros on; anything else (a norm not gated, a sigmoid, a conv with bias) does not.

Grouped convolutions (1 < groups < channels, as in ResNeXt, RegNet, DPN) keep their group structure: every conv
group must keep the same width, and torch-pruning removes the same positions in every conv group. So a group of
channels read or written by grouped convs gets one α entry per position inside a conv group, shared by that
position in every conv group: `ChannelGroup.repeat` channels per α entry (see there). Selection then counts each
entry as `repeat` channels (`select_ratio(..., repeats=...)`).

Groups that cannot be gated exactly are returned as `Skipped` with the reason; groups that belong to a scope that was
not asked for are returned as `Skipped` with `kind="out_of_scope"`, so a model never comes back with nothing said.
So are groups that a module the trace did not see may read or write, and groups that would cut a parameter held by
two modules (`width/flow.py`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torchvision.ops import MultiScaleRoIAlign

from ..errors import InputError
from .flow import Gaps, find_unseen, set_gaps
from .norms import NORMS as _NORMS
from .norms import has_affine, norm_width
from .trace import all_groups, build_graph, calls, reshape_problem, training_calls, unmapped

__all__ = ["GateSite", "ChannelGroup", "Skipped", "SCOPES", "find_groups"]

SCOPES = ("internal", "branch-input", "coupled")
Scope = Literal["internal", "branch-input", "coupled"]

_JOINT_NORMS = (nn.GroupNorm, nn.LayerNorm)
# grad_fn names (without the trailing version digit) of ops with f(0) = 0, applied per channel
_ZERO_PRESERVING = (
    "Relu", "Hardtanh", "Silu", "Gelu", "Hardswish", "LeakyRelu", "Elu", "Mish", "Tanh", "Threshold", "Prelu",
    "Mean", "Sum", "AvgPool2D", "AvgPool1D", "AdaptiveAvgPool2D", "AdaptiveAvgPool1D", "MaxPool2DWithIndices",
    "AdaptiveMaxPool2D", "View", "Reshape", "Unsafe", "Clone", "Flatten", "NativeDropout", "Squeeze", "Unsqueeze",
    "Permute", "Transpose", "Expand", "Contiguous", "Alias", "ToCopy", "Neg", "Div", "MulScalar",
    "Upsample",  # F.interpolate: nearest, bilinear, bicubic, ... are linear per channel
    # torchvision.ops.roi_align / roi_pool: bilinear samples / maxima of each channel in each box
    "GeneratedBackwardFor_torchvision_roi_align", "GeneratedBackwardFor_torchvision_roi_pool",
)
# modules that pool each channel on its own into a tensor of zeros (index_put of the pooled boxes by level): zero
# in, zero out, though the zeros they start from are not in the graph
_ZERO_FILLING = (MultiScaleRoIAlign,)
_UNSUPPORTED_TYPES = (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND, ops.OPTYPE.SLICE, ops.OPTYPE.CUSTOMIZED, ops.OPTYPE.MHA,
                      ops.OPTYPE.LSTM, ops.OPTYPE.EMBED, ops.OPTYPE.EXPAND)
# grad_fn names of traced functions that mix channels (a matmul, a functional conv): channels end there
_MIXING_OPS = ("Mm", "Bmm", "Addmm", "Matmul", "Linear", "Convolution", "Embedding")
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
    """A set of channels that share one α vector and are removed together.

    `repeat` is the number of channels each α entry gates: the group's α has `size // repeat` entries and channel c
    is gated by α[c % (size // repeat)], i.e. α is tiled `repeat` times along the channels. It is 1 unless grouped
    convolutions read or write the channels: a conv with G groups holds its channels in G contiguous blocks and must
    keep the same positions in each, so entry p gates position p of every block (repeat = G for one grouped conv;
    with several, the blocks of all of them). Keep masks and scores are per α entry; `size`, `min_channels` and
    `round_to` count channels.
    """

    name: str
    scope: Scope
    size: int
    sites: list[GateSite]
    root: str  # module whose out-channels index the group (branch-input: the entrance norm)
    members: list[str]  # every layer whose width changes with this group
    consumers: list[str] = dataclasses.field(default_factory=list)  # branch-input: layers whose inputs shrink
    repeat: int = 1  # channels per α entry (conv groups sharing one α per position)

    @property
    def num_alphas(self) -> int:
        """Length of the group's α vector: `size // repeat`."""
        return self.size // self.repeat

    def channel_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """A keep mask over α entries, expanded to the group's channels."""
        return keep.flatten().repeat(self.repeat)


@dataclasses.dataclass
class Skipped:
    """A group (or the whole model) that gets no gate, and why.

    kind "unsupported": the group is in the asked scopes but cannot be gated exactly (a coverage gap);
    "out_of_scope": it could be considered only with another scope (the reason names it).
    """

    name: str
    reason: str
    channels: int = 0  # channels left ungated (0 when unknown, e.g. a model that could not be traced)
    kind: Literal["unsupported", "out_of_scope"] = "unsupported"
    members: list[str] = dataclasses.field(default_factory=list)  # conv/linear layers reading or writing them


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


def _is_grouped(module) -> bool:
    """A grouped convolution that is not depthwise (1 < groups < out_channels)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module)


class _GroupView:
    """One torch-pruning group seen as a data-flow graph over its channel space."""

    def __init__(self, group, names: dict, param_names: dict | None = None, per_channel: frozenset = frozenset()):
        self.group, self.names, self.param_names = group, names, param_names or {}
        self.per_channel = per_channel  # graph nodes inside a module that pools each channel on its own
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
        if isinstance(node.module, torch.Tensor):
            return self.param_names.get(id(node.module), node.name)
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

    def producers(self) -> list:
        """Conv and linear layers that write this group's channels (depthwise convs only pass them on)."""
        return [n for n in self.handler if "out" in self.handler[n] and self.kind(n) == "producer"]

    def is_coupled(self) -> bool:
        """Whether the channels are tied to other layers' outputs through an add or concat (a residual).

        A concatenation always ties; an add whose inputs all come from the group's one producer (a global response
        norm's x + f(x)) does not.
        """
        if any(self.kind(n) == "concat" or _op_name(n) in ("CatBackward", "StackBackward") for n in self.handler):
            return True
        merges = any(self.kind(n) == "elementwise" and _is_merge(n) for n in self.handler)
        return merges and len(self.producers()) != 1

    def repeat(self) -> tuple[int, str | None]:
        """Channels per α entry imposed by the grouped convolutions among the members, or why they can't be cut.

        A conv with G groups over these channels needs the same positions kept in its G blocks of size/G channels;
        with several grouped convs, α has gcd(size/G_i) entries, each tiled size/gcd times.
        """
        blocks = []
        for item in self.items:
            node = item.dep.target
            m = node.module
            if not _is_grouped(m):
                continue
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                return 1, f"{self.name(node)} is a grouped transposed convolution (groups={m.groups})"
            for side in self.handler[node]:
                width = m.in_channels if side == "in" else m.out_channels
                if width != self.size or list(item.idxs) != list(range(self.size)):
                    return 1, (f"{self.name(node)} is a grouped convolution (groups={m.groups}) that reads or writes "
                               "only part of these channels")
                blocks.append(self.size // m.groups)
        return (self.size // math.gcd(*blocks), None) if blocks else (1, None)

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
            elif kind == "reshape" or node in self.per_channel:
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


def _zero_filling_nodes(model: nn.Module, dg) -> frozenset:
    """The graph nodes made inside the traced calls of `_ZERO_FILLING` modules (from their outputs back to their
    inputs)."""
    record = calls(dg)
    if record is None:
        return frozenset()
    node_of = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    out = set()
    for module in model.modules():
        if not isinstance(module, _ZERO_FILLING) or not record.ran(module):
            continue
        stop = set(record.inputs.get(module, []))
        stack, seen = [fn for fn in record.outputs[module] if fn is not None], set()
        while stack:
            fn = stack.pop()
            if fn in seen or fn in stop:
                continue
            seen.add(fn)
            if fn in node_of:
                out.add(node_of[fn])
            stack += [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
    return frozenset(out)


def _reaches_output(view: _GroupView) -> bool:
    """Whether the group's channels reach an output of the traced graph without a conv or linear layer reading them
    (through norms, element-wise ops, reshapes, concatenations): the output holds them, so removing any would change
    it (a detection head's class logits, viewed as anchors × classes and concatenated over the levels)."""
    stack = [n for n in view.handler if not view.reads(n)]
    stack += [o for n in view.producers() for o in n.outputs]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.type == ops.OPTYPE.OUTPUT:
            return True
        m = node.module
        if (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not _is_depthwise(m)) or _op_name(node).startswith(
                _MIXING_OPS):
            continue  # reads the channels (its own outputs are other channels)
        stack.extend(node.outputs)
    return False


def _site_for(view: _GroupView, node) -> GateSite:
    m = node.module
    name = view.name(node)
    if isinstance(m, _NORMS):
        act = getattr(m, "act", None)
        where = "act_input" if isinstance(act, nn.Module) else "output"
        return GateSite(name, where, "norm")
    return GateSite(name, "output", "producer", dim=-1 if isinstance(m, nn.Linear) else 1)


def _parameter_of(view: _GroupView, node):
    """The parameter node that `node` is (or views), if any."""
    if node.type == ops.OPTYPE.PARAMETER:
        return node
    if node.type == ops.OPTYPE.RESHAPE:
        return next((n for n in node.inputs if n.type == ops.OPTYPE.PARAMETER), None)
    return None


def _in_place(idxs, size: int, flattened: bool = False) -> bool:
    """Whether a member's channel indices are the group's own, 0..size-1 (in any order: torch-pruning lists the
    indices it carries through an add as a set); with `flattened`, also a reshape that flattens each channel into
    consecutive features (B, C, H, W) → (B, C·H·W) for a linear layer (`trace.reshape_problem` lets only such
    reshapes through), which torch-pruning maps and cuts."""
    got = sorted(int(i) for i in idxs)
    if got == list(range(size)):
        return True
    return flattened and len(got) % size == 0 and got == list(range(len(got)))


def _check_unsupported(view: _GroupView, failed: dict) -> str | None:
    for item in view.items:
        param = _parameter_of(view, item.dep.target)
        if param is not None:
            return (f"{view.name(param)} is a parameter applied to these channels outside any conv, linear or norm "
                    "layer (a global response norm, a layer scale); not supported")
    for item in view.items:
        node = item.dep.target
        kind = view.kind(node)
        m = node.module
        if kind == "joint_norm":
            return (f"{view.name(node)} normalises these channels jointly (GroupNorm/LayerNorm); removal would change "
                    "the rest")
        if kind == "reshape" and (problem := reshape_problem(node)):
            return f"{view.name(node)}: {problem}"
        if node in failed:
            return f"torch-pruning cannot map channel indices through {view.name(node)} ({failed[node]})"
        # a norm torch-pruning knows through `norms.CUSTOMIZED_PRUNERS` is a CUSTOMIZED node, and supported
        if kind in ("concat", "other") or (kind != "norm" and node.type in _UNSUPPORTED_TYPES):
            what = {ops.OPTYPE.CONCAT: "a concatenation", ops.OPTYPE.SPLIT: "a split (chunk)",
                    ops.OPTYPE.SLICE: "a slice"}.get(node.type, type(m).__name__ if m is not None else node.name)
            return f"{view.name(node)}: {what} of these channels is not supported yet"
        if isinstance(m, _NORMS) and not has_affine(m):
            return f"{view.name(node)} has no affine parameters to fold the gate into"
        # a linear layer's weight, transposed for its matmul, is a parameter-only node of the consumer's width
        weight_view = kind == "elementwise" and not node.inputs
        if kind != "consumer" and not _in_place(item.idxs, view.size, flattened=kind == "reshape" or weight_view):
            return f"{view.name(node)}: channel indices are remapped (concat/split/flatten)"
    return view.repeat()[1]


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


def _out_of_scope(coupled: bool, scopes: tuple, why: str | None) -> str:
    if coupled:
        where = "scope 'coupled' gates them" + ("" if "branch-input" in scopes else
                                                 " (or 'branch-input' their pre-activation branch entrances)")
        text = f"tied to other layers' outputs through a residual add or concatenation: {where}"
    else:
        text = "made and used inside one branch: scope 'internal' gates them"
    return text if why is None else f"{text}, but even there: {why}"


def _branch_input_group(view: _GroupView, norm, consumers: list) -> ChannelGroup | Skipped:
    nname = view.name(norm)
    cnames = [view.name(c) for c in consumers]
    size = norm_width(norm.module)
    if not has_affine(norm.module):
        return Skipped(f"input:{nname}", "norm has no affine parameters", size, members=[nname] + cnames)
    blocks = [size // c.module.groups for c in consumers if _is_grouped(c.module)]
    if any(isinstance(c.module, nn.modules.conv._ConvTransposeNd) and _is_grouped(c.module) for c in consumers):
        return Skipped(f"input:{nname}", "a grouped transposed convolution reads these channels", size,
                       members=[nname] + cnames)
    return ChannelGroup(name=f"input:{nname}", scope="branch-input", size=size, sites=[_site_for(view, norm)],
                        root=nname, members=[nname] + cnames, consumers=cnames,
                        repeat=size // math.gcd(*blocks) if blocks else 1)


def find_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    scopes: Iterable[str] = ("internal",),
    ignored: Iterable[nn.Module] = (),
    check_gaps: bool = True,
    outputs: Sequence[str] = (),
) -> tuple[list[ChannelGroup], list[Skipped], tp.DependencyGraph | None]:
    """The gateable channel groups of `model` for the given scopes, the groups not gated with reasons, and the graph.

    The skipped list holds kind "unsupported" entries (in the asked scopes, but not gateable exactly) and kind
    "out_of_scope" entries (gateable only with another scope, or not at all). With `check_gaps` (the default), a
    group is also skipped when a module the trace did not see may touch its channels, or when it would cut a
    parameter held by two modules (`flow.Gaps`, kept with the graph: `flow.gaps(dg)`); a cut already decided
    (`apply_spec`) passes False. `outputs` names submodules whose outputs the trace ends at instead of the model's
    (`trace.build_graph`). Channels that reach an output unread (logits, a detection head's predictions) are never
    pruned and not listed.
    """
    scopes = tuple(scopes)
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise InputError(f"scope {bad[0]!r} is unknown; choose from {', '.join(SCOPES)}")
    if "branch-input" in scopes and "coupled" in scopes:
        raise InputError("scopes 'branch-input' and 'coupled' gate the same residual channels; choose one of them")
    names = {m: n for n, m in model.named_modules()}
    try:
        dg = build_graph(model, example_input, outputs)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any tracing failure means this model cannot be gated
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        return [], [Skipped(type(model).__name__, f"dependency tracing failed: {type(err).__name__}: {err}",
                            members=layers)], None
    param_names = {id(p): n for n, p in model.named_parameters()}
    failed = unmapped(dg)
    found = (Gaps.of(model, find_unseen(model, dg, calls(dg), training_calls(model, example_input)), calls(dg))
             if check_gaps else Gaps())
    set_gaps(dg, found)
    per_channel = _zero_filling_nodes(model, dg)
    groups: list[ChannelGroup] = []
    skipped: list[Skipped] = []
    for group, root, failure in all_groups(dg, list(ignored)):
        if group is None:
            rname = names.get(root, type(root).__name__)
            skipped.append(Skipped(rname, failure, getattr(root, "out_channels", getattr(root, "out_features", 0)),
                                   members=[rname]))
            continue
        view = _GroupView(group, names, param_names, per_channel)
        gname = view.name(view.root)
        reason = _check_unsupported(view, failed)
        if _reaches_output(view) or (reason is None and not any(view.kind(n) == "consumer" for n in view.handler)):
            continue  # the model's outputs (classifier logits, a detection head's predictions): never pruned
        coupled = view.is_coupled()
        members = sorted({view.name(n) for n in view.handler if n.module is not None and n.module in names})
        gated, why = _gate_sites(view) if reason is None else ([], reason)
        # Pre-activation nets: channels read by norms at branch entrances and also by other layers (the residual
        # stream, or a stem feeding a block and its shortcut) are selected per branch, as Network Slimming does.
        if "branch-input" in scopes and (coupled or set(gated) - set(_last_norms(view))):
            entrances = _branch_inputs(view) if list(view.items[0].idxs) == list(range(view.size)) else []
            for norm, consumers in entrances:
                entry = _branch_input_group(view, norm, consumers)
                if isinstance(entry, ChannelGroup) and (
                        gap := found.reason(entry.name, {norm, *view.downstream(norm)}, names)):
                    entry = Skipped(entry.name, gap, entry.size, members=entry.members)
                (groups if isinstance(entry, ChannelGroup) else skipped).append(entry)
            if entrances:
                continue
        scope = "coupled" if coupled else "internal"
        if scope not in scopes:
            skipped.append(Skipped(gname, _out_of_scope(coupled, scopes, why), view.size, "out_of_scope", members))
            continue
        if why is None:
            why = found.reason(gname, view.handler, names)
        if why is not None:
            skipped.append(Skipped(gname, why, view.size, members=members))
            continue
        groups.append(ChannelGroup(name=gname, scope=scope, size=view.size, sites=[_site_for(view, n) for n in gated],
                                   root=gname, members=members, repeat=view.repeat()[0]))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    groups.sort(key=lambda g: order.get(g.root, len(order)))
    return groups, skipped, dg


def check_repeats(n: int, repeats: Sequence[int] | None, name: str = "repeats") -> list[int]:
    """Channels per α entry of each of `n` groups: `repeats` as a list of ints, checked (None: 1 each).

    `name` is the argument's name in the error (`select_budget` calls it `repeat`)."""
    if repeats is None:
        return [1] * n
    out = [_as_int(r) for r in repeats]
    if len(out) != n or any(r is None or r < 1 for r in out):
        raise InputError(f"{name} must hold one int >= 1 per group ({n} groups), got {repeats!r}")
    return out


def _as_int(value) -> int | None:
    """An int (or an integer numpy/torch scalar) as int; anything else (bools, floats) None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
