"""The topology-search commands behind `slimrarts cell-search` and `slimrarts train` (cell recipes): run folders
in, results out.

`search_command` writes into its run folder: recipe.yaml, metrics.jsonl, checkpoints/search.pt, alphas.json
(softmax(α) and the derived genotype after every epoch), costs.json (with a cost penalty), genotype.json,
genotype.txt, cells.png (with matplotlib) and report.json (genotype, skip-connections, eval-net parameters, times).
`train_command` trains the evaluation net of a genotype and writes model.pt and report.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_write, read_json
from ..data import make_loaders
from ..engine import Callback, Event, console, dist, fit, on, resolve_device, save_atomic
from ..engine.rundir import RunDir, check_run_dir, default_run_dir
from ..errors import InputError
from ..methods import get_method
from ..metrics import count_params, format_count
from ..nas.eval_net import build_eval_net, count_params_no_aux
from ..nas.genotypes import Genotype, count_skips, load_genotype
from ..nas.recipe import NasRecipe
from ..nas.search_net import SearchNetwork
from ..nas.topology import search_topology
from ..preflight import check_processes
from ..recipe import load_recipe
from ..runfolder import OpenRun, open_run
from ..version import __version__

__all__ = ["search_command", "train_command", "AuxLoss", "load_nas_recipe"]


def load_nas_recipe(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> NasRecipe:
    """A `NasRecipe` from a YAML file (with `base:`) or a dict, with `key=value` overrides."""
    return load_recipe(source, overrides, schema=NasRecipe)


def _run_dir(recipe: NasRecipe, out, resume: bool, force: bool, suffix: str) -> Path:
    """The run folder, checked but not touched (it is made or cleared once the data is loaded)."""
    if resume and not out:
        raise InputError("resume needs out: the run folder to continue")
    path = Path(out) if out else dist.from_main(lambda: default_run_dir(f"{recipe.name}-{suffix}"))
    return dist.from_main(lambda: check_run_dir(path, resume=resume, force=force))


def _start(recipe: NasRecipe, section: str) -> torch.device:
    """Join torchrun's process group when launched by it (a no-op otherwise); the device this process uses."""
    dist.init(recipe.device, backend=recipe.dist.backend, timeout_s=recipe.dist.timeout_s)
    device = resolve_device(recipe.device)
    check_processes(recipe, device, (section,))
    return device


def _prepare(run_dir: Path, recipe: NasRecipe, resume: bool, force: bool, loaders,
             model: torch.nn.Module | None = None) -> OpenRun:
    """Lock, check and make (or clear) the run folder and write or check its record (`runfolder.open_run`): rank 0
    alone, its error raised on every rank. The search net is built from the recipe alone (recipe.yaml checks it),
    so a search records no model; the evaluation net is recorded (its genotype file may have changed)."""
    return open_run(run_dir, recipe, resume=resume, force=force, model=model, loaders=loaders)


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def _eval_net_params(genotype: Genotype, recipe: NasRecipe, num_classes: int) -> dict:
    net = build_eval_net(genotype, num_classes=num_classes, C=recipe.train.C, layers=recipe.train.layers,
                         auxiliary=True, drop_path=0.0)
    return {"C": recipe.train.C, "layers": recipe.train.layers, "params": count_params_no_aux(net),
            "params_with_aux_head": count_params(net)}


class _AlphaLog(Callback):
    """alphas.json: softmax(α) of both cells and the derived genotype after each epoch (kept across a resume)."""

    events = (Event.EPOCH_END,)

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.epochs: dict[int, dict] = {}
        if resume and path.is_file():
            self.epochs = {e["epoch"]: e for e in read_json(path)["epochs"]}

    def apply(self, event: Event, state) -> None:
        if not dist.is_main():  # rank 0 alone writes
            return
        net: SearchNetwork = state.model
        epoch = state.epoch
        g = net.genotype()
        self.epochs = {e: v for e, v in self.epochs.items() if e < epoch}
        self.epochs[epoch] = {"epoch": epoch, "softmax": net.alpha_softmax(), "genotype": str(g),
                              "skip_connections": count_skips(g)}
        _write_json(self.path, {"primitives": list(net.primitives), "epochs": list(self.epochs.values())})


def search_command(recipe_path: str | os.PathLike | dict, overrides: list[str] | None = None,
                   out: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
                   progress: bool = True) -> int:
    """Search a DARTS cell with the recipe's method and write the genotype and its record into a run folder."""
    recipe = load_nas_recipe(recipe_path, overrides)
    device = _start(recipe, "search")
    run_dir = _run_dir(recipe, out, resume, force, "search")
    t0 = time.perf_counter()
    loaders = make_loaders(recipe.data, device, seed=recipe.seed, channels_last=recipe.search.channels_last,
                           per_process=recipe.dist.batch == "process")
    with _prepare(run_dir, recipe, resume, force, loaders):
        return _search(recipe, loaders, run_dir, device, t0, resume=resume, progress=progress)


def _search(recipe: NasRecipe, loaders, run_dir: Path, device: torch.device, t0: float, *, resume: bool,
            progress: bool) -> int:
    console.print(f"[bold]run folder[/] {run_dir}")
    result = search_topology(recipe, loaders, device=device, run_dir=run_dir, resume=resume, progress=progress,
                             callbacks=[_AlphaLog(run_dir / "alphas.json", resume)])
    g = result.genotype
    if not dist.is_main():  # the genotype is the same on every rank; rank 0 writes it
        return 0
    atomic_write(run_dir / "genotype.json", g.to_json(indent=1) + "\n")
    atomic_write(run_dir / "genotype.txt", str(g) + "\n")
    method = get_method(recipe.search.method, "search")
    num_classes = loaders.num_classes or 10
    report = {
        "kind": "topology-search", "method": method.name, "method_note": method.source, "passes": method.passes,
        "genotype": g.to_dict(), "genotype_text": str(g),
        "skip_connections": {"normal": count_skips(g, "normal"), "reduce": count_skips(g, "reduce")},
        "eval_net": _eval_net_params(g, recipe, num_classes),
        "search_net": {"C": recipe.net.C, "layers": recipe.net.layers, "steps": recipe.net.steps,
                       "params": count_params(result.net)},
        "cost": {"mode": recipe.cost.mode, "mu": recipe.cost.mu,
                 **({"unit": result.costs.unit, "scale": result.costs.scale} if result.costs else {})},
        "epochs": recipe.search.epochs, "final": result.history[-1] if result.history else {},
        "time_s": {"search": result.search_s, "wall": result.wall_s, "command": time.perf_counter() - t0},
        "seed": recipe.seed, "device": str(device), "threads": torch.get_num_threads(),
        "processes": dist.describe(),
        "versions": {"slimrarts": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "data": loaders.info, "settings_history": RunDir(run_dir).history(),
    }
    _write_json(run_dir / "report.json", report)
    try:
        from ..nas.plot import draw_cells

        draw_cells(g, run_dir / "cells.png", title=f"{method.name} · {recipe.name}")
    except ImportError as err:
        console.print(f"[yellow]cells.png skipped: {err}[/]")
    _print_search(report)
    return 0


def _print_search(report: dict) -> None:
    from rich.table import Table

    t = Table(title=f"slimrarts cell search · {report['method']} ({report['method_note']})")
    for col in ("skip-connections (normal/reduce)", "eval-net params (no aux)", "search time", "t acc", "v acc"):
        t.add_column(col, justify="right")
    sk, final = report["skip_connections"], report["final"]
    acc = lambda k: f"{100 * final[k]:.1f}%" if k in final else "—"  # noqa: E731
    t.add_row(f"{sk['normal']}/{sk['reduce']}", format_count(report["eval_net"]["params"]),
              f"{report['time_s']['search']:.0f} s", acc("t_acc"), acc("v_acc"))
    console.print(t)
    console.print(report["genotype_text"], markup=False, highlight=False)


# ---- training the evaluation net -----------------------------------------------------------------------------------


class AuxLoss:
    """Cross-entropy of the logits plus `weight` × that of the auxiliary logits, for `(logits, aux)` outputs; plain
    cross-entropy for a tensor output (eval mode, or a net without the head)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, tuple):
            logits, aux = output
            return F.cross_entropy(logits.float(), target) + self.weight * F.cross_entropy(aux.float(), target)
        return F.cross_entropy(output.float(), target)


def _drop_path_schedule(model, prob: float, epochs: int) -> Callable:
    """DARTS' schedule: drop-path probability prob · epoch / epochs at the start of each epoch."""
    return lambda state: model.set_drop_path(prob * state.epoch / epochs)


def train_command(recipe_path: str | os.PathLike | dict, overrides: list[str] | None = None,
                  out: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
                  progress: bool = True, genotype: str | os.PathLike | Genotype | None = None) -> int:
    """Train the evaluation net of a genotype (`genotype`, else `train.genotype`) from scratch; test accuracy is the
    final epoch's."""
    recipe = load_nas_recipe(recipe_path, overrides)
    tr = recipe.train
    source = genotype if genotype is not None else tr.genotype
    if source is None:
        raise InputError("no genotype to train: set train.genotype to a genotype.json of a search run or to a known "
                         "name (darts_v2, darts_v1)")
    g = load_genotype(source)
    device = _start(recipe, "train")
    run_dir = _run_dir(recipe, out, resume, force, "train")
    notes = []
    data_cfg = dataclasses.replace(recipe.data, batch_size=tr.batch_size or recipe.data.batch_size)
    cutout = tr.cutout
    if cutout and any(f.name == "cutout" for f in dataclasses.fields(data_cfg)):
        data_cfg = dataclasses.replace(data_cfg, cutout=cutout)
    elif cutout:
        notes.append(f"cutout {cutout} not applied: the data loader has no cutout yet")
        cutout = 0
    aux_weight = tr.auxiliary_weight
    loaders = make_loaders(data_cfg, device, seed=recipe.seed, channels_last=tr.channels_last,
                           per_process=recipe.dist.batch == "process")
    num_classes = loaders.num_classes or 10
    torch.manual_seed(recipe.seed)
    model = build_eval_net(g, num_classes=num_classes, C=tr.C, layers=tr.layers, auxiliary=aux_weight > 0,
                           drop_path=tr.drop_path).to(device)
    with _prepare(run_dir, recipe, resume, force, loaders, model):
        return _train_eval_net(recipe, g, model, loaders, run_dir, device, notes, cutout, resume=resume,
                               progress=progress)


def _train_eval_net(recipe: NasRecipe, g: Genotype, model: torch.nn.Module, loaders, run_dir: Path,
                    device: torch.device, notes: list[str], cutout: int, *, resume: bool, progress: bool) -> int:
    tr, aux_weight, num_classes = recipe.train, recipe.train.auxiliary_weight, loaders.num_classes or 10
    if dist.is_main():
        atomic_write(run_dir / "genotype.json", g.to_json(indent=1) + "\n")
    console.print(f"[bold]run folder[/] {run_dir}")
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = dist.convert_sync_bn(model)
    callbacks = [on(Event.EPOCH_START, _drop_path_schedule(model, tr.drop_path, tr.epochs))]
    if tr.grad_clip is not None:
        params = list(model.parameters())
        callbacks.append(on(Event.AFTER_BACKWARD,
                            lambda _: torch.nn.utils.clip_grad_norm_(params, tr.grad_clip, foreach=True)))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    result = fit(model, loaders.train, loaders.test, cfg=tr, device=device, run_dir=run_dir, resume=resume,
                 progress=progress, eval_every=max(1, tr.epochs // 10), callbacks=callbacks,
                 loss_fn=AuxLoss(aux_weight))
    final = result.final
    if not dist.is_main():  # rank 0 writes the model and the report
        return 0
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = dist.revert_sync_bn(model)
    info = {"name": "darts_cifar", "num_classes": num_classes,
            "kwargs": {"genotype": g.to_dict(), "C": tr.C, "layers": tr.layers, "auxiliary": aux_weight > 0}}
    save_atomic({"state_dict": model.state_dict(), "model": json.dumps(info)}, run_dir / "model.pt")
    report = {"kind": "cell-train", "model": info, "genotype_text": str(g), "params": count_params_no_aux(model),
              "epochs": tr.epochs, "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
              "train_acc": final.get("train_acc"), "train_s": result.train_s, "wall_s": result.wall_s,
              "images_per_s": result.images_per_s, "auxiliary_weight": aux_weight, "drop_path": tr.drop_path,
              "cutout": cutout, "notes": notes, "seed": recipe.seed, "device": str(device), "data": loaders.info,
              "processes": dist.describe(), "settings_history": RunDir(run_dir).history()}
    _write_json(run_dir / "report.json", report)
    console.print(f"test acc (final epoch) {100 * report['test_acc']:.2f}% · params {format_count(report['params'])}"
                  f" · {result.train_s:.0f} s")
    return 0
