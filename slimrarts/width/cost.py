"""MACs and parameters of the pruned network as a function of the channels each group keeps, without cutting it.

The counts are torch-pruning's (the op counter behind `metrics.macs_and_params`), taken layer by layer on the dense
model at the real input shape, then scaled by the widths that pruning changes. Which widths each group changes comes
from torch-pruning's pruning group (a layer's in- or out-channel handler), or, for a branch-input group, from its
entrance norm and consumers. How a layer's count changes with those widths is measured, not assumed: each layer is
cut on a copy with torch-pruning's own pruning function at two widths per side, and the counter is run on the copy.
All of torch-pruning's counts are multilinear in a layer's in- and out-widths (a conv is bilinear, a depthwise conv or
a norm linear in its one width, a bias linear in the out-width), so two widths per side determine them exactly.
Layers without a pruning function (activations, pools) count elements of a tensor: they scale with the group of the
layer that made the tensor, found by walking the autograd graph back through channel-preserving ops.

    cost(kept) = const + Σ_t  c_t · x_in(t) · x_out(t) + a_t · x_in(t) + b_t · x_out(t),   x_g = kept_g / size_g

with x = 1 for widths no gated group changes. `CostModel.function(kind)` gives this as a `CostFunction`, the
interface `select_budget` and `cost_penalty` use (a latency model gives one too).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..metrics import call_macs, full_proposals, is_counted
from ..modes import evaluating
from .gates import Gates

__all__ = ["CostFunction", "CostModel", "LayerCall", "build_cost_model", "cost_penalty", "group_layers"]

KINDS = ("macs", "params", "latency")
_LAST_DIM = (nn.Linear, nn.LayerNorm)  # layers whose channels are the last dimension of their input and output
# autograd nodes that mix channels: a walk back from an activation's input stops there (unknown width source)
# (a functional norm keeps the width: a norm whose width differs from its input's is a branch entrance, a gate site)
_MIXING = ("Convolution", "Addmm", "Mm", "Bmm", "Matmul", "Linear", "Cat", "Stack", "Split", "Unbind", "Embedding",
           "Index", "Gather")


class Bilinear:
    """f(x, y) = cxy·x·y + cx·x + cy·y + c1 (x, y: kept fractions of a layer's in- and out-width)."""

    __slots__ = ("c1", "cx", "cxy", "cy")

    def __init__(self, cxy: float = 0.0, cx: float = 0.0, cy: float = 0.0, c1: float = 0.0):
        self.cxy, self.cx, self.cy, self.c1 = cxy, cx, cy, c1

    def __call__(self, x: float, y: float) -> float:
        return self.cxy * x * y + self.cx * x + self.cy * y + self.c1

    def __add__(self, other: Bilinear) -> Bilinear:
        return Bilinear(self.cxy + other.cxy, self.cx + other.cx, self.cy + other.cy, self.c1 + other.c1)

    def bilinear(self) -> Bilinear:
        return self

    def __repr__(self) -> str:
        return f"Bilinear({self.cxy:g}·xy + {self.cx:g}·x + {self.cy:g}·y + {self.c1:g})"


@dataclasses.dataclass
class CostFunction:
    """One cost (MACs, parameters or seconds) as `const + Σ f_t(x_in, x_out)` over kept fractions of the groups.

    `terms[t] = (g_in, g_out, f_t)`: the groups that set term t's in- and out-width (None: a width that never
    changes, read as 1) and a callable of the two fractions (`Bilinear`, or a latency table).
    """

    kind: str
    sizes: list[int]
    const: float
    terms: list[tuple[int | None, int | None, Callable[[float, float], float]]]

    def __post_init__(self):
        self.by_group: list[list[int]] = [[] for _ in self.sizes]
        self.neighbours: list[set[int]] = [set() for _ in self.sizes]
        for t, (gi, go, _) in enumerate(self.terms):
            for g in {gi, go} - {None}:
                self.by_group[g].append(t)
            if gi is not None and go is not None:
                self.neighbours[gi].add(go)
                self.neighbours[go].add(gi)
        for g, n in enumerate(self.neighbours):
            n.discard(g)
        self.dense = self.value(self.sizes)

    def _frac(self, kept: Sequence[int], g: int | None) -> float:
        return 1.0 if g is None else kept[g] / self.sizes[g]

    def value(self, kept: Sequence[int]) -> float:
        """The cost with `kept[g]` of `sizes[g]` α entries kept in group g."""
        return self.const + sum(f(self._frac(kept, gi), self._frac(kept, go)) for gi, go, f in self.terms)

    def local(self, g: int, kept: Sequence[int]) -> float:
        """The part of the cost that depends on group g's width."""
        return sum(f(self._frac(kept, gi), self._frac(kept, go))
                   for gi, go, f in (self.terms[t] for t in self.by_group[g]))


@dataclasses.dataclass
class LayerCall:
    """One call of a counted layer in the dense model: its shapes and the groups that set its widths."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_group: int | None
    out_group: int | None
    tied: bool  # in- and out-width are one width (a norm, a depthwise conv, an activation): in_group holds it
    pruned: bool  # cut with torch-pruning's pruning function (conv, linear, norm); else an element-wise layer


class CostModel:
    """MACs and parameters of the network that `remove_channels` would make, as a function of kept counts.

    Call it with kept counts per group (α entries, or keep masks) to get `(macs, params)`, the same numbers
    `metrics.macs_and_params` gives for the cut model (batch 1). Build it with `build_cost_model(gates)`.
    """

    def __init__(self, groups, layers, calls, macs: CostFunction, params: CostFunction, module_names, input_size):
        self.groups = groups
        self.layers: list[dict[str, str]] = layers  # per group: {module name: role}, see `group_layers`
        self.calls: list[LayerCall] = calls
        self.sizes = [g.num_alphas for g in groups]  # α entries (a grouped conv's entry gates `repeat` channels)
        self._functions = {"macs": macs, "params": params}
        self.module_names: list[str] = module_names
        self.input_size = tuple(input_size)

    def function(self, kind: str) -> CostFunction:
        """The `CostFunction` of `kind` ('macs' or 'params'; a `LatencyModel` gives 'latency')."""
        if kind not in self._functions:
            raise InputError(f"cost kind {kind!r} is not in this model; choose from {', '.join(self._functions)}"
                             + ("; build a latency model for 'latency'" if kind == "latency" else ""))
        return self._functions[kind]

    @property
    def dense(self) -> tuple[int, int]:
        return self(self.sizes)

    def __call__(self, kept: Sequence[int] | Sequence[torch.Tensor]) -> tuple[int, int]:
        counts = kept_counts(kept, self.sizes)
        return round(self._functions["macs"].value(counts)), round(self._functions["params"].value(counts))


def kept_counts(kept: Sequence[int] | Sequence[torch.Tensor], sizes: Sequence[int]) -> list[int]:
    """Kept α entries per group from counts or keep masks, checked against the group sizes."""
    if len(kept) != len(sizes):
        raise InputError(f"got {len(kept)} kept counts for {len(sizes)} groups")
    out = [int(k.sum()) if isinstance(k, torch.Tensor) else int(k) for k in kept]
    for g, (k, n) in enumerate(zip(out, sizes, strict=True)):
        if not 0 <= k <= n:
            raise InputError(f"group {g} keeps {k} of {n} channels; allowed 0..{n}")
    return out


def group_layers(gates: Gates) -> list[dict[str, str]]:
    """Per group, the layers whose widths it changes: {module name: 'in' | 'out' | 'both' | 'inout'}.

    'both' is a layer whose in- and out-width are one (a norm, a depthwise conv: torch-pruning prunes its inputs and
    outputs with one function); 'inout' a layer that reads and writes the group's channels (two widths).
    """
    if gates.dg is None:
        raise InputError("these gates have no dependency graph (the model could not be traced)")
    model, dg = gates.model, gates.dg
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    out = []
    for group in gates.groups:
        roles: dict[str, str] = {}
        if group.scope == "branch-input":
            roles[group.root] = "both"
            roles.update({c: "in" for c in group.consumers})
        else:
            root = modules[group.root]
            pruner = dg.get_pruner_of_module(root)
            tp_group = dg.get_pruning_group(root, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(root))))
            for item in tp_group.items:
                module = item.dep.target.module
                if not isinstance(module, nn.Module) or module not in names:
                    continue  # an element-wise op of the trace, not a layer
                pruner = dg.get_pruner_of_module(module)
                if pruner is not None and pruner.prune_in_channels == pruner.prune_out_channels:
                    role = "both"
                else:
                    role = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                name = names[module]
                if roles.get(name, role) != role:
                    role = "inout"  # reads and writes this group's channels (RepVGG-style blocks)
                roles[name] = role
        out.append(roles)
    return out


def _width_groups(layers: list[dict[str, str]]) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Which group sets each layer's in-width and out-width, and which layers are tied (in = out)."""
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    tied: set[str] = set()
    for g, roles in enumerate(layers):
        for name, role in roles.items():
            for side, table in (("in", ins), ("out", outs)):
                if role in (side, "both", "inout"):
                    if table.get(name, g) != g:
                        raise InputError(f"the {side}-width of {name} is changed by two groups "
                                         f"({table[name]} and {g}); the cost model cannot count it")
                    table[name] = g
            if role == "both":
                tied.add(name)
    return ins, outs, tied


def _counted_modules(model: nn.Module) -> list[nn.Module]:
    """The modules torch-pruning's counter adds up: supported ones, found from the root without entering them."""
    out = []

    def visit(m):
        if is_counted(m):
            out.append(m)
        else:
            for c in m.children():
                visit(c)

    visit(model)
    return out


def _with_channels(shape: tuple[int, ...], dim: int, n: int) -> torch.Tensor:
    shape = list(shape)
    shape[dim] = n
    return torch.empty(shape, device="meta")


def _fit(values: dict[tuple[float, float], float]) -> Bilinear:
    """The multilinear function through 1, 2 or 4 points (x, y) ∈ {1, u} × {1, v}."""
    xs = sorted({x for x, _ in values})
    ys = sorted({y for _, y in values})
    f11 = values[(1.0, 1.0)]
    if len(xs) == 1 and len(ys) == 1:
        return Bilinear(c1=f11)
    if len(ys) == 1:
        u = xs[0]
        cx = (f11 - values[(u, 1.0)]) / (1 - u)
        return Bilinear(cx=cx, c1=f11 - cx)
    if len(xs) == 1:
        v = ys[0]
        cy = (f11 - values[(1.0, v)]) / (1 - v)
        return Bilinear(cy=cy, c1=f11 - cy)
    u, v = xs[0], ys[0]
    a = (f11 - values[(u, 1.0)]) / (1 - u)  # cxy + cx
    b = (values[(1.0, v)] - values[(u, v)]) / (1 - u)  # cxy·v + cx
    cxy = (a - b) / (1 - v)
    cx = a - cxy
    cy = (f11 - values[(1.0, v)]) / (1 - v) - cxy
    return Bilinear(cxy, cx, cy, f11 - cxy - cx - cy)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose own parameters and buffers are meta tensors (shapes only, no memory)."""
    memo: dict = {}
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _halves(n: int) -> list[int]:
    """Channels to remove at the evaluation points of one side: none, and half (if at least one is left)."""
    return [0, n // 2] if n >= 2 else [0]


def _layer_costs(module, pruner, calls, tied: bool, has_in: bool, has_out: bool) -> tuple[list[Bilinear], Bilinear]:
    """Per-call MACs and the parameter count of `module` as functions of its kept in/out fractions.

    The module is cut on copies with torch-pruning's pruning function at two widths per changing side, and the
    counter is run on each copy with meta tensors of the cut shapes.
    """
    n_in, n_out = pruner.get_in_channels(module), pruner.get_out_channels(module)
    dim = -1 if isinstance(module, _LAST_DIM) else 1
    if tied:
        points = [(r, 0) for r in _halves(n_out)]
    else:
        points = [(ri, ro) for ri in (_halves(n_in) if has_in else [0]) for ro in (_halves(n_out) if has_out else [0])]
    macs: list[dict] = [{} for _ in calls]
    params = {}
    for ri, ro in points:
        m = _meta_copy(module)
        if tied:
            if ri:
                pruner.prune_out_channels(m, list(range(ri)))
            key = ((n_out - ri) / n_out, 1.0)
        else:
            if ri:
                pruner.prune_in_channels(m, list(range(ri)))
            if ro:
                pruner.prune_out_channels(m, list(range(ro)))
            key = ((n_in - ri) / n_in, (n_out - ro) / n_out)
        params[key] = float(sum(p.numel() for p in m.parameters(recurse=False)))
        for call, table in zip(calls, macs, strict=True):
            inp = _with_channels(call.in_shape, dim, pruner.get_in_channels(m))
            out = _with_channels(call.out_shape, dim, pruner.get_out_channels(m))
            table[key] = call_macs(m, inp, out)
    return [_fit(t) for t in macs], _fit(params)


def _trace(model: nn.Module, x: torch.Tensor, registered: dict[nn.Module, str], counted: dict[nn.Module, str],
           act_sites: dict[str, nn.Module]):
    """One forward pass recording every counted call (shapes, input autograd node, torch-pruning's count) and the
    autograd node of every registered layer's output (for a norm gated at its `act` child's input, that input)."""
    made_by: dict = {}
    calls: list[tuple[str, tuple, tuple, object, float]] = []
    pending: dict[nn.Module, list] = {}
    handles = []

    def out_hook(module, _args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            made_by[out.grad_fn] = registered[module]

    def pre_hook(module, args):
        inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
        pending.setdefault(module, []).append(inp.grad_fn if inp is not None else None)

    def count_hook(module, args, output):
        fn = pending[module].pop()
        inp = args[0] if args else None
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor):
            calls.append((counted[module], tuple(inp.shape), tuple(out.shape), fn, call_macs(module, inp, out)))

    def act_hook(name):
        def hook(_module, args):  # runs after the gate's pre-hook: the gated input is the norm's output
            if args and isinstance(args[0], torch.Tensor) and args[0].grad_fn is not None:
                made_by[args[0].grad_fn] = name
        return hook

    for m in counted:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(count_hook))
    for m in registered:
        handles.append(m.register_forward_hook(out_hook))
    for name, act in act_sites.items():
        handles.append(act.register_forward_pre_hook(act_hook(name)))
    try:
        with evaluating(model), torch.enable_grad(), full_proposals(model):
            model(x.requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    return calls, made_by


def _sources(fn, made_by: dict) -> set[str | None]:
    """The registered layers whose outputs reach autograd node `fn` through channel-preserving ops (None: unknown)."""
    found: set[str | None] = set()
    stack, seen = [fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if f in made_by:
            found.add(made_by[f])
            continue
        name = f.name()
        if name.startswith("AccumulateGrad"):
            continue
        if name.startswith(_MIXING):
            found.add(None)
            continue
        stack.extend(nf for nf, _ in f.next_functions)
    return found


def build_cost_model(gates: Gates, input_size: Sequence[int] | None = None) -> CostModel:
    """The cost model of a gated model at one sample of `input_size` (C, H, W; default: the gates' example input).

    Build it before cutting (it runs the dense model once and cuts copies of single layers).
    """
    model = gates.model
    layers = group_layers(gates)
    ins, outs, tied = _width_groups(layers)
    if input_size is None:
        if gates.example_input is None:
            raise InputError("pass input_size=(C, H, W): these gates have no example input")
        input_size = tuple(gates.example_input.shape[1:])
    first = next(model.parameters())
    x = torch.randn((1, *input_size), device=first.device, dtype=first.dtype)
    names = {m: n for n, m in model.named_modules()}
    dg = gates.dg
    registered = {m: names[m] for m in dg.module2node if isinstance(m, nn.Module) and m in names}
    counted = {m: names[m] for m in _counted_modules(model)}
    modules = dict(model.named_modules())
    act_sites = {s.module: modules[s.module].act for g in gates.groups for s in g.sites if s.where == "act_input"}
    raw_calls, made_by = _trace(model, x, registered, counted, act_sites)

    calls: list[LayerCall] = []
    macs_terms: list[tuple[int | None, int | None, Bilinear]] = []
    by_module: dict[str, list] = {}
    for name, in_shape, out_shape, fn, dense in raw_calls:
        module = modules[name]
        pruner = dg.get_pruner_of_module(module) if module in registered else None
        if pruner is not None:
            gi, go = ins.get(name), outs.get(name)
            call = LayerCall(name, in_shape, out_shape, gi, None if name in tied else go, name in tied, True)
            if gi is None and go is None:
                macs_terms.append((None, None, Bilinear(c1=dense)))
            else:
                by_module.setdefault(name, []).append(call)
        else:
            groups = {outs.get(s) if s is not None else None for s in _sources(fn, made_by)}
            if len(groups) > 1:
                warnings.warn(f"{name}: its input comes from layers of different groups {sorted(map(str, groups))}; "
                              "counted at its dense width", RuntimeWarning, stacklevel=2)
            g = groups.pop() if len(groups) == 1 else None
            call = LayerCall(name, in_shape, out_shape, g, None, True, False)
            macs_terms.append((g, None, Bilinear(cx=dense) if g is not None else Bilinear(c1=dense)))
        calls.append(call)

    params_terms: list[tuple[int | None, int | None, Bilinear]] = []
    seen: set[int] = set()
    for name, module in modules.items():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own:
            continue
        gi, go = ins.get(name), outs.get(name)
        pruner = dg.get_pruner_of_module(module) if module in registered else None
        if pruner is None or (gi is None and go is None):
            params_terms.append((None, None, Bilinear(c1=float(sum(p.numel() for p in own)))))
            continue
        is_tied = name in tied
        mac_fits, param_fit = _layer_costs(module, pruner, by_module.get(name, []), is_tied, gi is not None,
                                           go is not None)
        key = (gi, None) if is_tied else (gi, go)
        params_terms.append((*key, param_fit))
        for fit in mac_fits:
            macs_terms.append((*key, fit))
        by_module.pop(name, None)
    for name, module_calls in by_module.items():  # counted layers without parameters of their own
        module = modules[name]
        gi, go = ins.get(name), outs.get(name)
        fits, _ = _layer_costs(module, dg.get_pruner_of_module(module), module_calls, name in tied,
                               gi is not None, go is not None)
        key = (gi, None) if name in tied else (gi, go)
        macs_terms.extend((*key, f) for f in fits)

    sizes = [g.num_alphas for g in gates.groups]
    return CostModel(gates.groups, layers, calls, _function("macs", sizes, macs_terms),
                     _function("params", sizes, params_terms), list(modules), input_size)


def _function(kind: str, sizes: list[int], terms) -> CostFunction:
    """A CostFunction with terms of equal groups merged and constant terms folded into `const`."""
    merged: dict[tuple, Bilinear] = {}
    const = 0.0
    for gi, go, f in terms:
        if gi is None and go is None:
            const += f(1.0, 1.0)
        else:
            merged[(gi, go)] = merged[(gi, go)] + f if (gi, go) in merged else f
    return CostFunction(kind, list(sizes), const, [(gi, go, f) for (gi, go), f in merged.items()])


class _Penalty:
    """μ · Cost(x(α)) / Cost_dense as a 0-d tensor, with x_g a smooth kept fraction of group g.

    Coefficients are stored divided by Cost_dense (numbers of order one, exact enough in float32) and cast once per
    α dtype.
    """

    def __init__(self, fn: CostFunction, alphas: list[torch.Tensor], mu: float, tau: float | None):
        self.alphas, self.mu, self.tau, self.dense = alphas, float(mu), tau, fn.dense
        device = alphas[0].device
        sizes = [a.numel() for a in alphas]
        if sizes != fn.sizes:
            raise InputError(f"alphas have sizes {sizes[:5]}... but the cost function's groups have {fn.sizes[:5]}...")
        n = len(sizes)
        self.owner = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(sizes, device=device))
        fits = [f.bilinear() for _, _, f in fn.terms]
        self.gi = torch.tensor([n if gi is None else gi for gi, _, _ in fn.terms], device=device, dtype=torch.long)
        self.go = torch.tensor([n if go is None else go for _, go, _ in fn.terms], device=device, dtype=torch.long)
        coef = torch.tensor([[b.cxy, b.cx, b.cy, b.c1] for b in fits], dtype=torch.float64).reshape(-1, 4)
        self._master = {"coef": (coef / fn.dense).to(device),
                        "inv_size": (1.0 / torch.tensor(sizes, dtype=torch.float64)).to(device)}
        self._cast: dict[torch.dtype, dict[str, torch.Tensor]] = {}
        self.const = fn.const / fn.dense
        self.norm = 1.0 if tau is None else float(torch.tanh(torch.tensor(1.0 / tau)))

    def _tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if dtype not in self._cast:
            self._cast[dtype] = {k: v.to(dtype) for k, v in self._master.items()}
        return self._cast[dtype]

    def widths(self, alphas: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x_g = mean_c |α_c| (τ None), or mean_c tanh(|α_c|/τ) / tanh(1/τ): 1 at α = 1."""
        mags = torch.cat([a.flatten() for a in (self.alphas if alphas is None else alphas)]).abs()
        if self.tau is not None:
            mags = torch.tanh(mags / self.tau) / self.norm
        inv_size = self._tensors(mags.dtype)["inv_size"]
        return torch.zeros_like(inv_size).index_add(0, self.owner, mags) * inv_size

    def relative(self, alphas: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Cost(α) / Cost_dense."""
        x = self.widths(alphas)
        x = torch.cat([x, x.new_ones(1)])
        xi, xo = x[self.gi], x[self.go]
        c = self._tensors(x.dtype)["coef"]
        return self.const + (c[:, 0] * xi * xo + c[:, 1] * xi + c[:, 2] * xo + c[:, 3]).sum()

    def cost(self, alphas: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Cost(α) in the cost function's unit (MACs, parameters, seconds)."""
        return self.relative(alphas) * self.dense

    def __call__(self, alphas: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        return self.relative(alphas) * self.mu


def cost_penalty(fn: CostFunction, alphas: list[torch.Tensor], mu: float = 1.0,
                 tau: float | None = None) -> Callable[..., torch.Tensor]:
    """A differentiable cost term in α for `Problem.arch_penalty()`: a callable returning μ·Cost(α)/Cost_dense.

    Call it with no argument for the `alphas` given here (or with other α tensors of the same sizes); `.cost()`
    gives Cost(α) unscaled.

    Cost(α) is `fn` (MACs, parameters, or a latency model's bilinear fit) at smooth widths: x_g = mean_c |α_c| over
    group g, so 1 at the initial α = 1 and the term starts at μ. Its gradient on channel c of group g is
    μ/(Cost_dense·size_g) · ∂Cost/∂x_g · sign(α_c): an ℓ1 pull whose weight is the channel's marginal cost at the
    current smooth widths, as in MorphNet's FLOP regulariser; its exact zeros come from the ℓ1 proximal step (`l1`
    mode) or the selection. With `tau`, x_g = mean_c tanh(|α_c|/τ)/tanh(1/τ), a soft count of live channels whose
    pull fades on channels with |α| ≫ τ. No host synchronisation: the term is a few vector ops on α's device.
    """
    if not alphas:
        raise InputError("there are no gated channels: a cost term needs at least one α")
    if mu < 0:
        raise InputError(f"mu must be >= 0, got {mu}")
    if tau is not None and tau <= 0:
        raise InputError(f"tau must be > 0 or None, got {tau}")
    return _Penalty(fn, alphas, mu, tau)
