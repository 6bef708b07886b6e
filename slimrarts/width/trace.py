"""torch-pruning's DependencyGraph, made to survive the models it cannot fully map: build it, list its groups.

Two of torch-pruning's internals are wrapped here, and only here (tested against torch-pruning 1.5-1.6 by
`tests/test_zoo.py::test_torch_pruning_internals_we_wrap_exist`):

- `dependency.index_mapping.update_index_mapping` infers how channel indices move through every concat, split,
  reshape, slice and unbind, and raises when one of them defeats its shape inference (ShuffleNetV2's channel shuffle:
  ZeroDivisionError; DPN's dual-path concatenations: TypeError). The whole graph was lost for one node. Here each
  node is mapped on its own; a node that fails is recorded in `unmapped(dg)` and every group that reaches it is
  skipped with the error as its reason.
- `dependency.graph.Group`: a group that grows without end (ReXNet's partial-channel residuals) raises `Diverged`.

The graph comes from one forward pass in eval mode; `build_graph` also records which modules that pass ran, the
autograd nodes of their inputs and outputs, and the parameters read outside their module's forward (`calls(dg)`);
`training_calls` runs the model once more in training mode, leaving no trace in its buffers or the random streams,
to see what runs only there.
`width/flow.py` reads both to find what the trace did not see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency import graph as _tp_graph
from torch_pruning.dependency import index_mapping as _tp_index_mapping

from ..errors import InputError
from ..modes import evaluating, training
from .norms import CUSTOMIZED_PRUNERS

__all__ = ["DIVERGED", "Calls", "Diverged", "all_groups", "build_graph", "calls", "module_outputs", "pruning_group",
           "reshape_problem", "tolerant_mapping", "training_calls", "unmapped"]

DIVERGED = ("torch-pruning's dependency search did not converge on this group (a residual that adds into part of "
            "the channels, as in ReXNet, maps indices without end)")

# torch-pruning's per-node index-mapping updaters, by the node type they apply to (update_index_mapping's dispatch)
_UPDATERS = {
    ops.OPTYPE.CONCAT: "update_concat_index_mapping",
    ops.OPTYPE.SPLIT: "update_split_index_mapping",
    ops.OPTYPE.RESHAPE: "update_reshape_index_mapping",
    ops.OPTYPE.UNBIND: "update_unbind_index_mapping",
    ops.OPTYPE.EXPAND: "update_expand_index_mapping",
    ops.OPTYPE.SLICE: "update_slice_index_mapping",
}
_UNMAPPED_ATTR = "_slimrarts_unmapped"
# nodes whose groups are never gated (see groups._check_unsupported): group searches stop there
_BARRIER_TYPES = (ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.SLICE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND)


def _stop(_idxs) -> list:
    return []


def _sizes(grad_fn, attr: str) -> list[int] | None:
    value = getattr(grad_fn, attr, None)
    return [int(v) for v in value] if value is not None else None


def _feeds_matmul(node) -> bool:
    """Whether a neighbour of `node` is a linear layer or the matmul torch traces inside one."""
    for n in list(node.inputs) + list(node.outputs):
        fn = getattr(n, "grad_fn", None)
        if isinstance(n.module, nn.Linear) or (fn is not None and fn.name().startswith(("Addmm", "MmBackward"))):
            return True
    return False


def reshape_problem(node) -> str | None:
    """Why a view/reshape node moves channels (None when the channels stay put or are flattened in order).

    Accepted: the channel dimension is kept ((B, C, H, W) → (B, C, HW)); a pooled map is flattened
    ((B, C, 1, 1) → (B, C)); a map is flattened for a linear layer ((B, C, H, W) → (B, CHW), which torch-pruning
    maps); the leading dims of channels-last activations are merged or split around a linear layer
    ((B, H, W, C) ↔ (BHW, C)). A channel shuffle's (B, C, H, W) → (B, g, C/g, H, W) is not.
    """
    fn = node.grad_fn
    src = _sizes(fn, "_saved_self_sym_sizes") or _sizes(fn, "_saved_self_sizes")
    meta = getattr(fn, "_input_metadata", None)  # the forward outputs' metadata (torch >= 2.1)
    dst = list(meta[0].shape) if meta else None
    if src is None or dst is None:
        return "a reshape whose shapes torch does not record"
    if len(src) < 2 or len(dst) < 2:
        return None if src[1:] == dst[1:] else f"a reshape {tuple(src)} → {tuple(dst)}"
    if src[:2] == dst[:2] or (math.prod(src[2:]) == 1 and dst[1] == src[1]):
        return None
    if len(dst) == 2 and dst[1] == math.prod(src[1:]):
        return None
    if src[-1] == dst[-1] and _feeds_matmul(node):
        return None
    return f"a reshape {tuple(src)} → {tuple(dst)} that moves channels (a channel shuffle or split by view)"


class Diverged(Exception):
    """A torch-pruning group grew past any real group's size."""


def _is_barrier(node, failed: dict) -> bool:
    return (node.type in _BARRIER_TYPES or node in failed
            or (node.type == ops.OPTYPE.RESHAPE and reshape_problem(node) is not None))


def _update_each_node(graph) -> None:
    """update_index_mapping, one node at a time: a node whose mapping fails is recorded, not fatal.

    Then every node whose groups are never gated (concat, split, slice, a reshape that moves channels, a node that
    could not be mapped) gets index mappings that map to nothing, so torch-pruning's group search enters it and stops
    there. The group still holds the node (and is skipped for it) but does not run on through mis-mapped indices:
    that took ShuffleNetV2 half a minute and ended in IndexErrors, and made DPN's groups grow without end.
    """
    failed = getattr(graph, _UNMAPPED_ATTR, None)
    if failed is None:
        failed = {}
        setattr(graph, _UNMAPPED_ATTR, failed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")  # it then gives up: recorded
        for node in list(graph.module2node.values()):
            updater = _UPDATERS.get(node.type)
            if updater is None:
                continue
            try:
                getattr(_tp_index_mapping, updater)(graph, node)
            except Exception as err:  # noqa: BLE001 - torch-pruning's shape inference failing on this node
                failed.setdefault(node, f"{type(err).__name__}: {err}")
    barriers = getattr(graph, "_slimrarts_barriers", None)
    if barriers is None:
        barriers = [n for n in graph.module2node.values() if _is_barrier(n, failed)]
        graph._slimrarts_barriers = barriers
    for node in barriers:
        for dep in node.dependencies:
            dep.index_mapping = [_stop, _stop]


@contextlib.contextmanager
def tolerant_mapping(frozen: bool = False) -> Iterator[None]:
    """Inside the block, torch-pruning maps channel indices node by node and records the nodes it cannot map.

    With `frozen` (a graph that is not being pruned), the mapping is computed once and not again for every group.
    """
    original = _tp_index_mapping.update_index_mapping
    done: set[int] = set()

    def update(graph) -> None:
        if frozen and id(graph) in done:
            return
        _update_each_node(graph)
        done.add(id(graph))

    _tp_index_mapping.update_index_mapping = update
    try:
        yield
    finally:
        _tp_index_mapping.update_index_mapping = original


def unmapped(dg: tp.DependencyGraph) -> dict:
    """The graph nodes whose channel index mapping failed, with the error."""
    return getattr(dg, _UNMAPPED_ATTR, {})


@dataclasses.dataclass
class Calls:
    """The modules one forward pass ran, each with the tensors it read and returned (every call's, in order).

    `build_graph` keeps the tensors' autograd nodes (`grad_fn`s, which the graph's nodes hold too) instead of the
    tensors; `training_calls` keeps the tensors.
    """

    inputs: dict[nn.Module, list] = dataclasses.field(default_factory=dict)
    outputs: dict[nn.Module, list] = dataclasses.field(default_factory=dict)
    # parameters that a torch function read outside their module's forward (`F.conv2d(x, self.c1.weight)`): the
    # parameter → (the module whose forward did it, the function's name); the first such use of each
    outside: dict[nn.Parameter, tuple[nn.Module, str]] = dataclasses.field(default_factory=dict)

    def ran(self, module: nn.Module) -> bool:
        return module in self.outputs


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a module's arguments or output (tuples, lists, dicts and namedtuples opened)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class _OutsideUses(torch.overrides.TorchFunctionMode):
    """Records, into `record.outside`, each parameter a torch function reads while the forward of the module that
    holds it is not running (the modules running are `stack`, kept by forward hooks)."""

    def __init__(self, model: nn.Module, record: Calls, stack: list[nn.Module]):
        super().__init__()
        self.holders = {id(p): m for m in model.modules() for p in m._parameters.values() if p is not None}
        self.record, self.stack = record, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:  # inside the model's forward (not torch-pruning's own work around it)
            for value in torch.utils._pytree.tree_leaves((args, kwargs)):
                holder = self.holders.get(id(value)) if isinstance(value, nn.Parameter) else None
                if holder is not None and holder not in self.stack and value not in self.record.outside:
                    self.record.outside[value] = (self.stack[-1], getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _recording(model: nn.Module, outside: bool = False) -> Iterator[Calls]:
    """Record every module call of the forward passes inside the block (before any other forward hook rewrites an
    output, e.g. the model's output adapter); with `outside`, also the parameters read outside their module's
    forward (`Calls.outside`)."""
    record = Calls()
    stack: list[nn.Module] = []

    def enter(module, _args):
        if module is model:  # a new pass: what a failed one left (torch-pruning tries `model(*x)` first) goes
            stack.clear()
        stack.append(module)

    def hook(module, args, kwargs, output):
        if module is model:
            stack.clear()
        elif stack and stack[-1] is module:
            stack.pop()
        record.inputs.setdefault(module, []).extend(_tensors((args, kwargs)))
        record.outputs.setdefault(module, []).extend(_tensors(output))

    handles = [m.register_forward_hook(hook, with_kwargs=True, prepend=True) for m in model.modules()]
    if outside:
        handles += [m.register_forward_pre_hook(enter, prepend=True) for m in model.modules()]
    try:
        with _OutsideUses(model, record, stack) if outside else contextlib.nullcontext():
            yield record
    finally:
        for h in handles:
            h.remove()


_CALLS_ATTR = "_slimrarts_calls"


def module_outputs(model: nn.Module, names: Sequence[str], what: str = "outputs") -> Callable:
    """A function `run(model, x)` that calls `model(x)` and returns what the submodules `names` returned, in that
    order (a list per module, one entry per call); a name that is not a submodule, or one that did not run, raises
    `InputError` naming `what` (the argument it came from)."""
    names = list(names)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{what}: {name!r} is not a submodule of {type(model).__name__}") from None

    def run(model: nn.Module, x) -> list[list]:
        caught: dict[str, list] = {n: [] for n in names}
        hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: caught[n].append(out))
                 for n in names]
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
        idle = [n for n in names if not caught[n]]
        if idle:
            raise InputError(f"{what}: {', '.join(map(repr, idle))} did not run in the model's forward")
        return [caught[n] for n in names]

    return run


def build_graph(model: nn.Module, example_input: torch.Tensor, outputs: Sequence[str] = ()) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model` (in eval mode), tolerant of nodes it cannot map; `calls(dg)` says
    which modules its forward pass ran.

    With `outputs` (submodule names), the graph ends at what those modules return instead of the model's output: a
    detection model's raw head predictions, not the boxes its post-processing selects (`heads.raw_output_modules`).
    """
    forward = module_outputs(model, outputs, "outputs") if outputs else None
    with evaluating(model), tolerant_mapping(), _recording(model, outside=True) as record:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False,
                                                   forward_fn=forward, customized_pruners=dict(CUSTOMIZED_PRUNERS))
    as_nodes = Calls({m: [t.grad_fn for t in ts] for m, ts in record.inputs.items()},
                     {m: [t.grad_fn for t in ts] for m, ts in record.outputs.items()}, record.outside)
    setattr(dg, _CALLS_ATTR, as_nodes)
    return dg


def calls(dg: tp.DependencyGraph) -> Calls | None:
    """The modules the graph's traced forward ran, with the `grad_fn`s of their inputs and outputs (None for a graph
    not made by `build_graph`)."""
    return getattr(dg, _CALLS_ATTR, None)


def training_calls(model: nn.Module, example_input: torch.Tensor) -> Calls | None:
    """The modules one forward pass in training mode runs (auxiliary heads, training-only branches), with the tensors
    they read and returned (recorded by autograd, so that a tensor can be followed back to the modules it was made
    from; no backward pass is made); None when that pass fails (e.g. a batch norm over one value per channel).

    The buffers (BatchNorm statistics, counters) are put back and the random streams (dropout) are left where they
    were, so nothing of this pass shows in the run.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [example_input.device] if example_input.device.type == "cuda" else []
    x = example_input.detach().clone().requires_grad_(example_input.is_floating_point())  # every tensor gets a grad_fn
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=devices), training(model), _recording(model) as record:
            model(x)
        return record
    except Exception:  # noqa: BLE001 - then only the traced pass counts as seen
        return None
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def pruning_group(dg: tp.DependencyGraph, module: nn.Module, idxs: list[int]):
    """torch-pruning's group for removing `module`'s output channels `idxs` (with tolerant mapping)."""
    with tolerant_mapping():
        return dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)


@contextlib.contextmanager
def _bounded_groups(limit: int) -> Iterator[None]:
    """Make DependencyGraph.get_pruning_group raise `Diverged` once a group grows past `limit` items.

    torch-pruning's traversal revisits a node whenever it arrives with new indices; with partial-channel residuals the
    indices keep changing and the group grows without end. A real group has a few items per graph node at most.
    """
    base = _tp_graph.Group

    class Bounded(base):
        def add_dep(self, dep, idxs):
            if len(self) >= limit:
                raise Diverged
            super().add_dep(dep, idxs)

    _tp_graph.Group = Bounded
    try:
        yield
    finally:
        _tp_graph.Group = base


def all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> list[tuple[object | None, nn.Module, str]]:
    """Every pruning group rooted at a conv or linear layer's out-channels, as (group, root, "").

    This is DependencyGraph.get_all_groups with a bound on each group's size, so one bad group is skipped instead of
    hanging the search; a group whose search diverges or fails comes as (None, root, reason).
    """
    with tolerant_mapping(frozen=True):  # the graph does not change while its groups are listed
        return list(_all_groups(dg, ignored))


def _all_groups(dg: tp.DependencyGraph, ignored: list[nn.Module]) -> Iterator[tuple[object | None, nn.Module, str]]:
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
        except Diverged:
            visited.add(module)
            yield None, module, DIVERGED
            continue
        except Exception as err:  # noqa: BLE001 - an index mapping that breaks on this group (e.g. a bad split)
            visited.add(module)
            yield None, module, f"torch-pruning's group search failed: {type(err).__name__}: {err}"
            continue
        usable = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                usable = usable and not any(dep.target.module is m for m in ignored_all)
        if usable:
            yield group, module, ""
