"""Latency as a cost: per-layer times measured over a grid of widths (HALP-style), and tightening after the cut.

`build_latency_model(gates)` times every layer whose width a gated group changes, alone, on the target device at
its real input shape (batch `batch_size`), at a few widths per changing side (by default 1, ¼, ½, ¾ and all of
the group's channels), cut with torch-pruning's pruning function like the real removal. Between grid points the
time is interpolated (piecewise bilinear); each table is made non-decreasing in every width (a narrower layer is
never predicted slower, which noise can otherwise suggest: slow outliers at small widths are clipped). The network's
time is the sum over layers plus a constant, measured as the dense network's time minus the sum of its layers at full
width (launch gaps, layers no group changes). Tables are cached as JSON per device, torch version, model shapes,
batch, dtype and timer in `$SLIMRARTS_CACHE/latency` (else `~/.cache/slimrarts/latency`).

On CUDA (or with `probe_align=True`) the model also checks whether widths that are multiples of 8 run faster than
one channel less; `LatencyModel.align` is 8 only when measured so, to be passed as `round_to`.

A model is a prediction: `tighten` times the real slim network against the dense one (interleaved repeats, median
and run-to-run spread) and, while it misses the target, selects again under a lower target, a bounded number of
times.

In another runtime (onnxruntime, which fuses each conv with its norm and activation, so per-layer times do not carry
over and timing single exported layers would be dominated by the session's call overhead) the tables stay eager
PyTorch's, as a ranking of where time goes, scaled so that the dense network predicts its time measured in that
runtime (`LatencyModel.scaled`); the floor check and `tighten` time whole exported networks in it.

Timing runs through `slimrarts.timing` (the one harness); its timers are injectable (`timer(fn, n) -> n seconds`)
so tests are exact.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write
from ..errors import InputError
from ..timing import Timer, Timing, device_name, device_timer, latency_cache_dir, median_time, time_models
from .cost import Bilinear, CostFunction, CostModel, LayerCall, build_cost_model
from .gates import Gates, strip_hooks, ungated_copy

__all__ = [
    "LatencyModel",
    "TightenResult",
    "Timing",
    "build_latency_model",
    "latency_cache_dir",
    "tighten",
    "time_models",
]

TABLE_FORMAT = 1


def _monotone(values: Sequence[Sequence[float]]) -> np.ndarray:
    """Make a table non-decreasing in both widths by lowering entries above a wider entry (timing noise is mostly
    upward: a slow outlier at a small width is clipped to the time of the wider layer)."""
    v = np.asarray(values, dtype=float)
    v = np.minimum.accumulate(v[::-1], axis=0)[::-1]
    return np.minimum.accumulate(v[:, ::-1], axis=1)[:, ::-1]


class _Table:
    """A layer's seconds on a grid of kept fractions (xs: in-width, ys: out-width), piecewise bilinear between."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], values: Sequence[Sequence[float]]):
        self.xs, self.ys = list(xs), list(ys)
        self.values = _monotone(values)

    @staticmethod
    def _locate(grid: list[float], x: float) -> tuple[int, float]:
        if len(grid) == 1:
            return 0, 0.0
        i = min(max(bisect.bisect_right(grid, x) - 1, 0), len(grid) - 2)
        return i, (x - grid[i]) / (grid[i + 1] - grid[i])

    def __call__(self, x: float, y: float) -> float:
        i, u = self._locate(self.xs, x)
        j, w = self._locate(self.ys, y)
        v = self.values
        i1 = min(i + 1, len(self.xs) - 1)
        j1 = min(j + 1, len(self.ys) - 1)
        return float((1 - u) * ((1 - w) * v[i, j] + w * v[i, j1]) + u * ((1 - w) * v[i1, j] + w * v[i1, j1]))

    def bilinear(self) -> Bilinear:
        """Least-squares fit c·xy + a·x + b·y + d over the grid (the smooth form the search's cost term uses)."""
        pts = [(x, y) for x in self.xs for y in self.ys]
        basis = np.array([[x * y, x, y, 1.0] for x, y in pts])
        keep = [k for k, col in enumerate(basis.T) if np.ptp(col) > 0 or k == 3]
        sol, *_ = np.linalg.lstsq(basis[:, keep], self.values.reshape(-1), rcond=None)
        coef = [0.0] * 4
        for k, c in zip(keep, sol, strict=True):
            coef[k] = float(c)
        return Bilinear(*coef)


class LatencyModel:
    """Predicted seconds of the cut network as a function of kept counts; `function('latency')` for selection.

    Also answers 'macs' and 'params' through its cost model, so one object serves every budget kind.
    """

    def __init__(self, table: dict, cost_model: CostModel, path: Path | None = None):
        self.table, self.cost_model, self.path = table, cost_model, path
        self.groups, self.layers, self.module_names = cost_model.groups, cost_model.layers, cost_model.module_names
        self.sizes = cost_model.sizes
        index = {g.name: i for i, g in enumerate(cost_model.groups)}
        terms = []
        for unit in table["units"]:
            gi = index[unit["in_group"]] if unit["in_group"] is not None else None
            go = index[unit["out_group"]] if unit["out_group"] is not None else None
            terms.append((gi, go, _Table(unit["xs"], unit["ys"], unit["seconds"])))
        self._fn = CostFunction("latency", list(self.sizes), float(table["const_s"]), terms)

    @property
    def align(self) -> int:
        """8 when widths that are multiples of 8 measured faster on this device, else 1 (use as `round_to`)."""
        return int(self.table.get("align", 1))

    @property
    def dense_s(self) -> float:
        """The measured dense time (the model predicts exactly this at full width)."""
        return float(self.table["dense_s"])

    def function(self, kind: str) -> CostFunction:
        return self._fn if kind == "latency" else self.cost_model.function(kind)

    def scaled(self, dense_s: float, runtime: dict) -> LatencyModel:
        """This model with every time scaled so that the dense network predicts `dense_s` (its time measured in
        `runtime`, a `deploy.runtime_record`); the table records the factor and the runtime."""
        factor = dense_s / self.dense_s
        table = copy.deepcopy(self.table)
        table["dense_s"], table["const_s"] = dense_s, float(table["const_s"]) * factor
        for unit in table["units"]:
            unit["seconds"] = [[t * factor for t in row] for row in unit["seconds"]]
        table["scaled"] = {"factor": factor, "to": runtime, "from": "torch eager per-layer tables",
                           "torch_dense_s": self.dense_s}
        return LatencyModel(table, self.cost_model, self.path)

    def __call__(self, kept) -> float:
        from .cost import kept_counts

        return self._fn.value(kept_counts(kept, self.sizes))


def _entry_grid(n: int, grid: Sequence[float]) -> list[int]:
    """Kept α entries at which a group of n is timed: 1, the grid fractions, and n."""
    return sorted({1, n, *(min(n, max(1, round(f * n))) for f in grid)})


class _Unit:
    """One layer call timed alone: builds the layer at given kept fractions and an input of the matching shape."""

    def __init__(self, call: LayerCall, module: nn.Module, pruner, sizes: list[int]):
        self.call, self.module, self.pruner, self.sizes = call, module, pruner, sizes
        if call.pruned:
            self.dim = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) or len(call.in_shape) == 2 else 1
        else:  # an element-wise layer: its channels are dim 1, or the last dim (channels-last activations)
            n = sizes[call.in_group]
            self.dim = 1 if len(call.in_shape) > 1 and call.in_shape[1] % n == 0 else -1

    def build(self, kx: int | None, ky: int | None, device, dtype, channels_last: bool, batch: int):
        """(layer, input) with kx of the in-group's and ky of the out-group's entries kept (None: all)."""
        c = self.call
        layer = copy.deepcopy(self.module)
        strip_hooks(layer)  # the gates' hooks (and any other) do not belong to a layer timed alone
        if c.pruned:
            if c.tied:
                n = self.pruner.get_out_channels(layer)
                cut = n - n * kx // self.sizes[c.in_group] if kx is not None else 0
                if cut:
                    self.pruner.prune_out_channels(layer, list(range(cut)))
            else:
                if kx is not None:
                    n = self.pruner.get_in_channels(layer)
                    cut = n - n * kx // self.sizes[c.in_group]
                    if cut:
                        self.pruner.prune_in_channels(layer, list(range(cut)))
                if ky is not None:
                    n = self.pruner.get_out_channels(layer)
                    cut = n - n * ky // self.sizes[c.out_group]
                    if cut:
                        self.pruner.prune_out_channels(layer, list(range(cut)))
            width = self.pruner.get_in_channels(layer)
        else:
            n = c.in_shape[self.dim]
            width = n * kx // self.sizes[c.in_group] if kx is not None else n
        shape = [batch, *c.in_shape[1:]]
        shape[self.dim] = width
        layer = layer.to(device=device, dtype=dtype).eval()
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            layer = layer.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return layer, x


def _unit_key(call: LayerCall, module: nn.Module, groups) -> list:
    def gname(g):
        return None if g is None else [groups[g].name, groups[g].size]

    return [call.name, type(module).__name__, repr(module), list(call.in_shape), list(call.out_shape),
            gname(call.in_group), gname(call.out_group), call.tied]


def build_latency_model(gates: Gates, cost_model: CostModel | None = None, *, device: str | torch.device | None = None,
                        batch_size: int = 1, dtype: torch.dtype | None = None, channels_last: bool = False,
                        grid: Sequence[float] = (0.25, 0.5, 0.75), warmup: int = 3, repeats: int = 10,
                        timer: Timer | None = None, cache: bool = True, refresh: bool = False,
                        probe_align: bool | None = None) -> LatencyModel:
    """Measure (or load from the cache) the per-layer latency tables of a gated model; see the module docstring.

    Build it before cutting and before the search (it only runs copies of single layers and of the dense model).
    `timer(fn, n)` returns n seconds, one per call of fn (default: CUDA events on CUDA, a wall clock elsewhere).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if any(not 0 < f < 1 for f in grid):
        raise InputError(f"grid fractions must lie in (0, 1), got {tuple(grid)}")
    cost_model = cost_model if cost_model is not None else build_cost_model(gates)
    first = next(gates.model.parameters())
    device = torch.device(device) if device is not None else first.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = dtype or first.dtype
    timer = timer or device_timer(device)
    modules = dict(gates.model.named_modules())
    groups, sizes = cost_model.groups, cost_model.sizes
    units = []
    for call in cost_model.calls:
        if call.in_group is None and call.out_group is None:
            continue
        module = modules[call.name]
        pruner = gates.dg.get_pruner_of_module(module) if call.pruned else None
        units.append(_Unit(call, module, pruner, sizes))
    key = {"format": TABLE_FORMAT, "device": device_name(device, detail=True), "torch": torch.__version__,
           "batch": batch_size, "dtype": str(dtype), "channels_last": channels_last, "grid": list(grid),
           "warmup": warmup, "repeats": repeats, "timer": getattr(timer, "__qualname__", type(timer).__name__),
           "input_size": list(cost_model.input_size), "probe_align": probe_align,
           "units": [_unit_key(u.call, u.module, groups) for u in units]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = latency_cache_dir() / f"width-{digest}.json"
    if cache and not refresh and path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == json.loads(json.dumps(key, default=str)):
                return LatencyModel(stored["table"], cost_model, path)
        except (OSError, ValueError, KeyError) as e:
            warnings.warn(f"ignoring the unreadable latency cache {path}: {e}", RuntimeWarning, stacklevel=2)

    table_units = []
    at_full = 0.0
    with torch.no_grad():
        for u in units:
            c = u.call
            kxs = _entry_grid(sizes[c.in_group], grid) if c.in_group is not None else [None]
            kys = _entry_grid(sizes[c.out_group], grid) if c.out_group is not None else [None]
            seconds = []
            for kx in kxs:
                row = []
                for ky in kys:
                    layer, x = u.build(kx, ky, device, dtype, channels_last, batch_size)
                    row.append(median_time(timer, lambda layer=layer, x=x: layer(x), warmup, repeats))
                seconds.append(row)
            at_full += float(_monotone(seconds)[-1, -1])
            table_units.append({
                "name": c.name,
                "in_group": groups[c.in_group].name if c.in_group is not None else None,
                "out_group": groups[c.out_group].name if c.out_group is not None else None,
                "xs": [1.0] if c.in_group is None else [k / sizes[c.in_group] for k in kxs],
                "ys": [1.0] if c.out_group is None else [k / sizes[c.out_group] for k in kys],
                "seconds": seconds,
            })
        dense = ungated_copy(gates).to(device=device, dtype=dtype).eval()
        if channels_last:
            dense = dense.to(memory_format=torch.channels_last)
        x = torch.randn((batch_size, *cost_model.input_size), device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dense_s = median_time(timer, lambda: dense(x), warmup, repeats)
        probe = probe_align if probe_align is not None else device.type == "cuda"
        probes = _probe_alignment(units, table_units, timer, device, dtype, channels_last, batch_size, warmup,
                                  repeats) if probe else []
    faster = sum(p["aligned_s"] < p["unaligned_s"] for p in probes)
    table = {"dense_s": dense_s, "const_s": dense_s - at_full, "units": table_units, "device": key["device"],
             "batch_size": batch_size, "align": 8 if probes and 2 * faster > len(probes) else 1,
             "align_probes": probes}
    if cache:
        try:
            atomic_write(path, json.dumps({"key": key, "table": table}, default=str))
        except OSError as e:
            warnings.warn(f"could not write the latency cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return LatencyModel(table, cost_model, path if cache else None)


def _probe_alignment(units, table_units, timer, device, dtype, channels_last, batch, warmup, repeats) -> list[dict]:
    """Time the slowest layers at a multiple of 8 channels and at one channel less (out-width, else in-width)."""
    ranked = sorted(range(len(units)), key=lambda i: -table_units[i]["seconds"][-1][-1])
    probes = []
    for i in ranked:
        u = units[i]
        c = u.call
        side = "out" if c.out_group is not None and u.call.pruned else "in"
        g = c.out_group if side == "out" else c.in_group
        n = u.sizes[g]
        width = (int(0.75 * n) // 8) * 8
        if width < 8:
            continue
        times = []
        for k in (width, width - 1):
            kx, ky = (None, k) if side == "out" else (k, None)
            layer, x = u.build(kx, ky, device, dtype, channels_last, batch)
            times.append(median_time(timer, lambda layer=layer, x=x: layer(x), warmup, repeats))
        probes.append({"name": c.name, "channels": width, "aligned_s": times[0], "unaligned_s": times[1]})
        if len(probes) == 3:
            break
    return probes


def _next_target(history: list[dict], target_s: float) -> float:
    """The model target expected to give a measured `target_s`: a secant step on (predicted, measured) of the last
    two rounds (an additive correction after the first); below the last prediction after a miss, above it after a
    cut that was faster than needed."""
    p1, m1 = history[-1]["predicted_s"], history[-1]["measured_s"]
    slope = 1.0
    if len(history) >= 2 and "measured_s" in history[-2]:
        p0, m0 = history[-2]["predicted_s"], history[-2]["measured_s"]
        if p1 != p0 and (m1 - m0) / (p1 - p0) > 0:
            slope = (m1 - m0) / (p1 - p0)
    step = p1 - (m1 - target_s) / slope
    return min(step, p1 * 0.999) if m1 > target_s else max(step, p1 * 1.001)


@dataclasses.dataclass
class TightenResult:
    """The last selection and its slim network, their timings, and every round's targets and measurements."""

    keep: list[torch.Tensor]
    model: nn.Module
    timing: Timing
    dense_timing: Timing
    met: bool
    history: list[dict]


def tighten(select: Callable[[float], list[torch.Tensor]], cut: Callable[[list[torch.Tensor]], nn.Module],
            dense: nn.Module, target_s: float, input_size: Sequence[int], *,
            predict: Callable[[list[torch.Tensor]], float] | None = None, max_rounds: int = 3,
            tolerance: float = 0.0, slack: float = 0.1, times: Callable[..., list[Timing]] | None = None,
            **timing: Any) -> TightenResult:
    """Select, cut and time until the slim network meets `target_s`, lowering the model's target when it misses.

    `select(t)` returns keep masks for a model target of t seconds (e.g. `select_budget(..., kind='latency')`),
    `cut(keep)` a slim network (leaving the gated model usable for the next round), `predict(keep)` the model's
    seconds for a selection. After a miss, the next model target is the prediction lowered by the miss (the model's
    error on this selection, assumed additive), then secant steps on (predicted, measured) of the last two rounds;
    a cut that meets the target but runs faster than target·(1 − `slack`) (the model over-predicted it, so it
    pruned more than needed) is loosened the same way, keeping the met cut closest to the target. At most
    `max_rounds` selections are made. `tolerance` accepts a median up to target·(1 + tolerance); `timing` goes to
    `times` (default `time_models`; `functools.partial(deploy.time_in, "onnxruntime")` times in onnxruntime). A
    lowered target below the model's floor ends the loop. The result says whether the target was met; a miss also
    warns.
    """
    if max_rounds < 1:
        raise InputError(f"max_rounds must be >= 1, got {max_rounds}")
    model_target = float(target_s)
    history: list[dict] = []
    result = best = None  # best: the met cut closest to the target
    for round_ in range(max_rounds):
        try:
            keep = select(model_target)
        except ValueError as e:
            if result is None:
                raise
            history.append({"round": round_, "model_target_s": model_target, "stopped": str(e)})
            break
        slim = cut(keep)
        dense_t, slim_t = (times or time_models)([dense, slim], input_size, **timing)
        predicted = predict(keep) if predict is not None else model_target
        met = slim_t.median_s <= target_s * (1 + tolerance)
        history.append({"round": round_, "model_target_s": model_target, "predicted_s": predicted,
                        "measured_s": slim_t.median_s, "spread": slim_t.spread, "dense_s": dense_t.median_s,
                        "met": met})
        result = TightenResult(keep, slim, slim_t, dense_t, met, history)
        if met:
            if best is None or slim_t.median_s > best.timing.median_s:
                best = result
            if slim_t.median_s >= target_s * (1 - slack):
                return best
        model_target = _next_target(history, target_s)
        if model_target <= 0:
            history[-1]["stopped"] = "the corrected target is not positive"
            break
    if best is not None:  # loosened as far as the rounds allowed
        best.history = history
        return best
    warnings.warn(f"latency target {target_s * 1e3:.3g} ms not met after {len(history)} selection(s): measured "
                  f"{result.timing.median_s * 1e3:.3g} ms (spread {result.timing.spread:.1%}); the per-layer model "
                  "misses this device's behaviour, or the target is within its noise", RuntimeWarning, stacklevel=2)
    result.met = False
    return result
