"""`search_topology()`: a DARTS cell search with any registered search method, through `run_search`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .._io import atomic_write, read_json
from ..engine import dist
from ..engine.callbacks import Callback
from ..search.loop import search_from_section
from ..search.problem import NetProblem
from .genotypes import Genotype
from .latency import OpCosts, cost_penalty, op_costs
from .recipe import NasRecipe
from .search_net import SearchNetwork

__all__ = ["TopologyResult", "build_search_net", "search_costs", "search_topology"]


@dataclasses.dataclass
class TopologyResult:
    """The derived genotype, the searched net (α in `net.arch`), per-epoch history, times and cost tables."""

    genotype: Genotype
    net: SearchNetwork
    history: list[dict]
    search_s: float
    wall_s: float
    costs: OpCosts | None


def build_search_net(recipe: NasRecipe, num_classes: int, device: torch.device) -> SearchNetwork:
    """The recipe's search net on `device`, seeded by `recipe.seed` (weights first, then α, as DARTS)."""
    torch.manual_seed(recipe.seed)
    n = recipe.net
    return SearchNetwork(C=n.C, num_classes=num_classes, layers=n.layers, steps=n.steps).to(device)


def _costs_from(data: dict) -> OpCosts:
    t = {k: torch.tensor(data[k]) for k in ("normal", "reduce", "raw_normal", "raw_reduce")}
    return OpCosts(**t, unit=data["unit"], scale=data["scale"], info=data["info"])


def search_costs(net: SearchNetwork, recipe: NasRecipe, run_dir: Path | None = None,
                 resume: bool = False) -> OpCosts | None:
    """The cost tables of the recipe's `cost.mode` (None for `none`); a resumed run reuses its own `costs.json`. In
    a process group rank 0 measures (or reads) them and every rank uses its tables."""
    c = recipe.cost
    if c.mode == "none":
        return None
    path = Path(run_dir) / "costs.json" if run_dir is not None else None

    def tables() -> OpCosts:
        if resume and path is not None and path.is_file():
            return _costs_from(read_json(path))
        costs = op_costs(net, c.mode, batch=c.batch, warmup=c.warmup, repeats=c.repeats)
        if path is not None:
            atomic_write(path, json.dumps(costs.to_dict(), indent=1))
        return costs

    if not dist.active():
        return tables()
    return _costs_from(dist.from_main(lambda: tables().to_dict()))


def search_topology(recipe: NasRecipe, loaders, *, device: torch.device, run_dir: str | Path | None = None,
                    resume: bool = False, progress: bool = True,
                    callbacks: Iterable[Callback] = ()) -> TopologyResult:
    """Search the cells of `recipe.net` on `loaders.search_t`/`search_v` (the whole `train` set for `joint`) with
    `recipe.search.method`, then derive the genotype. `callbacks` see the search net as `state.model`."""
    s = recipe.search
    net = build_search_net(recipe, loaders.num_classes or 10, device)
    if recipe.dist.sync_bn and dist.world_size() > 1:
        net = dist.convert_sync_bn(net)
    if s.channels_last:
        net.to(memory_format=torch.channels_last)
    costs = search_costs(net, recipe, run_dir, resume)
    penalty = None
    if costs is not None and recipe.cost.mu > 0:
        penalty = cost_penalty(net.arch, [costs.normal, costs.reduce], recipe.cost.mu)
    problem = NetProblem(net, net.arch, amp=s.amp, penalty=penalty)
    _, result = search_from_section(problem, s, loaders, run_dir=run_dir, resume=resume, progress=progress,
                                    callbacks=callbacks)
    return TopologyResult(genotype=net.genotype(), net=net, history=result.history, search_s=result.train_s,
                          wall_s=result.wall_s, costs=costs)
