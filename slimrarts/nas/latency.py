"""Per-operation cost tables of a search net (measured latency or a MACs proxy) and the cost penalty μ·Cost(α).

`op_costs(net, mode)` gives `Lat` of shape (edges, operations) for the normal and the reduction cell: entry (e, k)
is the cost of operation k on edge e summed over every cell of that type in the net (all normal cells share
α_normal, so this sum is what α_normal's choice on edge e costs the whole net). Each (operation, input shape,
stride) is measured once on the current device: the median of `repeats` forward passes after `warmup`, in eval
mode, at batch `batch`; measurements are cached as JSON in the user cache folder, keyed by device name, torch
version, threads, batch and shapes. `none` and the identity (skip_connect on a normal edge) cost 0.

Normalisation: the tables are divided by their mean entry over all edges of both cells and every operation but
`none`, so the average candidate operation costs 1 on any machine and in either mode. Then
μ·Σ_e⟨softmax(α_e), Lat_e⟩ is about μ·(number of edges) at the start of a search, and μ = 0.002 (the paper's
value, with its latencies in ms of the order of one per op) is a mild penalty of the same order as the paper's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable

import torch

from .._io import atomic_write
from ..errors import InputError
from ..metrics import count_macs, measure_latency
from ..modes import evaluating
from ..timing import device_name, latency_cache_dir
from .operations import is_identity, make_op
from .search_net import MixedOp, SearchNetwork

__all__ = ["OpCosts", "edge_shapes", "op_costs", "cost_penalty", "latency_cache_dir", "COST_MODES"]

COST_MODES = ("latency", "macs")


@dataclasses.dataclass
class OpCosts:
    """Normalised cost tables (edges × operations) of both cells, their raw values, unit and scale."""

    normal: torch.Tensor
    reduce: torch.Tensor
    raw_normal: torch.Tensor
    raw_reduce: torch.Tensor
    unit: str  # of the raw tables: "ms" or "MACs"
    scale: float  # raw = normalised · scale
    info: dict

    def to_dict(self) -> dict:
        return {"unit": self.unit, "scale": self.scale, "info": self.info, "raw_normal": self.raw_normal.tolist(),
                "raw_reduce": self.raw_reduce.tolist(), "normal": self.normal.tolist(), "reduce": self.reduce.tolist()}


@torch.no_grad()
def edge_shapes(net: SearchNetwork, input_size: tuple[int, int, int] = (3, 32, 32)) -> list[dict]:
    """Every mixed edge of `net`: its cell type, edge index, channels, input height/width and stride."""
    records: list[dict] = []
    hooks = []
    for cell in net.cells:
        for e, op in enumerate(cell.edges):
            assert isinstance(op, MixedOp)

            def hook(mod, args, cell=cell, e=e):
                _, c, h, w = args[0].shape
                records.append({"cell": "reduce" if cell.reduction else "normal", "edge": e, "C": int(c),
                                "H": int(h), "W": int(w), "stride": mod.stride})
            hooks.append(op.register_forward_pre_hook(hook))
    device = next(net.parameters()).device
    try:
        with evaluating(net):
            net(torch.zeros((1, *input_size), device=device))
    finally:
        for h in hooks:
            h.remove()
    return records


def _op_free(name: str, stride: int) -> bool:
    return name == "none" or (name == "skip_connect" and stride == 1)


def _measure_ms(shapes: list[tuple], primitives, device, batch, warmup, repeats, cache: bool) -> dict[str, float]:
    key = {"device": device_name(device, detail=True), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "batch": batch, "shapes": sorted(shapes)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = latency_cache_dir() / f"ops-{digest}.json"
    table: dict[str, float] = {}
    if cache and path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == json.loads(json.dumps(key)):
                table = stored["ms"]
        except (OSError, ValueError, KeyError):
            table = {}
    missing = False
    for c, h, w, stride in shapes:
        for name in primitives:
            k = f"{name}|{c}x{h}x{w}|s{stride}"
            if k in table:
                continue
            missing = True
            op = make_op(name, c, stride, affine=False, search=True).to(device)
            if _op_free(name, stride) or is_identity(op):
                table[k] = 0.0
                continue
            stats = measure_latency(op, (c, h, w), batch_sizes=(batch,), device=device, warmup=warmup,
                                    repeats=repeats)
            table[k] = 1e3 * stats[batch]["median_s"]
    if cache and missing:
        atomic_write(path, json.dumps({"key": key, "ms": table}, indent=1))
    return table


def _macs(shapes: list[tuple], primitives) -> dict[str, float]:
    table = {}
    for c, h, w, stride in shapes:
        for name in primitives:
            op = make_op(name, c, stride, affine=False, search=True)
            free = _op_free(name, stride)
            table[f"{name}|{c}x{h}x{w}|s{stride}"] = 0.0 if free else float(count_macs(op, (1, c, h, w)))
    return table


def op_costs(net: SearchNetwork, mode: str = "latency", *, device: torch.device | str | None = None, batch: int = 1,
             warmup: int = 10, repeats: int = 50, cache: bool = True,
             input_size: tuple[int, int, int] = (3, 32, 32)) -> OpCosts:
    """Cost tables of `net`'s normal and reduction cells: measured latency (ms) or MACs per image (torch-pruning's
    count, as `slimrarts.metrics.count_macs`: convs plus one per element of norms, activations and pools)."""
    if mode not in COST_MODES:
        raise InputError(f"cost mode {mode!r} is unknown; choose one of {', '.join(COST_MODES)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"batch must be an int >= 1, got {batch!r}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    records = edge_shapes(net, input_size)
    shapes = sorted({(r["C"], r["H"], r["W"], r["stride"]) for r in records})
    prims = net.primitives
    table = _measure_ms(shapes, prims, device, batch, warmup, repeats, cache) if mode == "latency" else _macs(shapes,
                                                                                                               prims)
    n_edges = len(net.cells[0].edges)
    raw = {"normal": torch.zeros(n_edges, len(prims), dtype=torch.float64),
           "reduce": torch.zeros(n_edges, len(prims), dtype=torch.float64)}
    for r in records:
        for k, name in enumerate(prims):
            raw[r["cell"]][r["edge"], k] += table[f"{name}|{r['C']}x{r['H']}x{r['W']}|s{r['stride']}"]
    present = [raw[c] for c in ("normal", "reduce") if any(r["cell"] == c for r in records)]
    cols = [k for k, name in enumerate(prims) if name != "none"]
    scale = float(torch.cat([t[:, cols] for t in present]).mean()) if present else 1.0
    scale = scale if scale > 0 else 1.0
    info = {"mode": mode, "device": device_name(device, detail=True), "torch": torch.__version__, "batch": batch,
            "threads": torch.get_num_threads(), "primitives": list(prims),
            "shapes": [list(s) for s in shapes], "cells": {c: sum(1 for cell in net.cells if cell.reduction == (
                c == "reduce")) for c in ("normal", "reduce")}}
    return OpCosts(normal=(raw["normal"] / scale).float(), reduce=(raw["reduce"] / scale).float(),
                   raw_normal=raw["normal"].float(), raw_reduce=raw["reduce"].float(),
                   unit="ms" if mode == "latency" else "MACs", scale=scale, info=info)


def cost_penalty(arch: list[torch.Tensor], costs: list[torch.Tensor], mu: float) -> Callable[[], torch.Tensor]:
    """μ·Σ_cells Σ_e ⟨softmax(α_e), Lat_e⟩ as a callable for `NetProblem(penalty=...)` (α and costs paired in order)."""
    if len(arch) != len(costs):
        raise InputError(f"cost_penalty: {len(arch)} α tensors but {len(costs)} cost tables")
    for a, c in zip(arch, costs, strict=True):
        if a.shape != c.shape:
            raise InputError(f"cost_penalty: α of shape {tuple(a.shape)} paired with costs of shape {tuple(c.shape)}")
    if mu < 0:
        raise InputError(f"cost_penalty: mu must be >= 0, got {mu}")
    tables = [c.detach().to(a.device, torch.float32) for a, c in zip(arch, costs, strict=True)]

    def penalty() -> torch.Tensor:
        total = None
        for a, c in zip(arch, tables, strict=True):
            term = (torch.softmax(a.float(), dim=-1) * c).sum()
            total = term if total is None else total + term
        return mu * total

    return penalty
