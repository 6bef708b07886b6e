"""`prune()`: gate → search on D_t/D_v → select → fold and remove → fine-tune → evaluate → report."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .baselines.random_pruning import read_reference
from .data.factory import Loaders, as_loaders
from .deploy import resolve_runtime, runtime_record, time_in
from .engine import dist
from .engine.device import resolve_device
from .engine.distill import Distiller
from .engine.epochs import PhaseResult
from .engine.fit import evaluate, fit
from .engine.recalibrate import recalibrate_bn
from .engine.rundir import RunDir, check_run_dir
from .engine.step import batches_on
from .engine.task import CLASSIFICATION, Classification, Task
from .errors import InputError
from .methods import MethodInfo, get_method
from .metrics import macs_and_params
from .models import create_model
from .models.io import attach_io
from .models.provenance import infer_model_info
from .preflight import check_data, check_first_batches, check_model, finite_model, model_outputs
from .recipe import Recipe
from .report import build_report
from .runfolder import OpenRun, open_run
from .timing import speed_report
from .width import (
    Gates,
    load_slim,
    save_slim,
)
from .width.select import Selection
from .widthsearch import REGULARIZED, WidthSearch, _attach, _resolve_recipe, remove_checked, resolve_task
from .widthsearch import _take_final_weights as _take_final_weights  # benchmarks and tests import it from here

__all__ = ["PruneResult", "PruneRun", "WidthSearch", "finetune", "finish", "load", "prepare", "prune", "recalibrate",
           "remove", "resolve_task", "search", "search_width", "select"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneResult:
    """The slim fine-tuned model (a plain nn.Module), the report, and the width spec it was cut to."""

    model: nn.Module
    report: dict
    width_spec: dict


def _example_input(loaders: Loaders, device: torch.device, n: int = 8, task: Task = CLASSIFICATION) -> torch.Tensor:
    """The first images of D_t, as the loader gives them (the pre-flight checks read their dtype; `task.example`
    makes a batch tensor of a detection batch's images); in a process group, rank 0's, so gates, checks and
    reports see the same input on every rank."""
    def first() -> torch.Tensor:
        for x, _ in batches_on(loaders.search_t, device, task=task):
            return task.example(x)[:n].contiguous()
        raise InputError("the search loader yields no batches")

    if not dist.active():
        return first()
    return dist.from_main(lambda: first().cpu()).to(device)


def _task_kw(method: MethodInfo, task: Task) -> dict:
    """`task=` for a baseline that takes it; a baseline that does not runs for classification only."""
    if "task" in inspect.signature(method.run).parameters:
        return {"task": task}
    if type(task) is not Classification:
        raise InputError(f"baseline {method.name!r} does not take a task (its run function has no task= argument), "
                         f"so it cannot run the {task.name} task or a custom loss; choose another search.method")
    return {}


def search_width(model: nn.Module, loaders, recipe: Recipe, *, device: torch.device, run_dir: Path | None = None,
                 resume: bool = False, progress: bool = True, example_input: torch.Tensor | None = None,
                 task: Task = CLASSIFICATION) -> WidthSearch:
    """Attach gates to `model` (in place) and learn α with the recipe's search method on `task`'s loss, in the
    library's own loop (`WidthSearch.run`: the recipe's epochs and schedules, checkpoints in `run_dir`).

    Returns the `WidthSearch` (gates, search state, `result`: the phase's record); `model` holds w afterwards.
    """
    loaders = as_loaders(loaders, seed=recipe.seed)
    if recipe.search.channels_last:
        model.to(memory_format=torch.channels_last)
    x = example_input if example_input is not None else _example_input(loaders, device, task=task).float()
    found = WidthSearch(model, x, config=recipe, task=task)
    found.run(loaders, run_dir=run_dir, resume=resume, progress=progress)
    return found


def _search_note(method: MethodInfo, recipe: Recipe) -> str:
    """The method's source, and what this run changed in it (a magnitude start makes it a hybrid)."""
    s = recipe.search
    parts = []
    if s.init == "magnitude":
        parts.append("hybrid: α started from the per-group normalised magnitude (|γ|), layers rescaled")
    if s.score != "alpha":
        parts.append({"alpha_gamma": "channels ranked by |α·γ|", "grad": "channels ranked by Σ|α ⊙ ∇_α|"}[s.score])
    return "; ".join([method.source, *parts]) if parts else ""


@dataclasses.dataclass
class PruneRun:
    """What the stages of `prune()` pass along: the settings, data and model they work on, and what each found.

    `prepare` makes it; `search`, `select`, `remove`, `recalibrate` and `finetune` fill it in that order; `finish`
    turns it into the `PruneResult`."""

    recipe: Recipe
    method: MethodInfo
    device: torch.device
    loaders: Loaders
    model: nn.Module  # the copy being searched and cut (the user's model is not touched)
    example: torch.Tensor  # a float batch of D_t (traces, checks, cost counts)
    task: Task = CLASSIFICATION
    run_dir: RunDir | None = None
    resume: bool = False
    progress: bool = True
    model_info: dict | None = None
    io_hooks: list = dataclasses.field(default_factory=list)
    dense_model: nn.Module | None = None  # the frozen dense copy: distillation teacher, latency reference
    started: float = 0.0
    cost_before: tuple[int, int] = (0, 0)
    accuracy: dict = dataclasses.field(default_factory=dict)  # the test set's figures, stage by stage
    gates: Gates | None = None
    selection: Selection | None = None
    width_search: WidthSearch | None = None  # a search (or slimming): α, weights and cut (other baselines: None)
    scores: list[torch.Tensor] | None = None  # per α entry, higher survives
    keep: list[torch.Tensor] | None = None  # per α entry, the channels the cut keeps
    search_phase: PhaseResult | None = None
    note: str = ""
    spec: dict | None = None
    cost_after: tuple[int, int] = (0, 0)
    recalibrated: int = 0
    finetune_phase: PhaseResult | None = None
    opened: OpenRun | None = None  # the run folder, locked by this process until `close()` (rank 0)
    report_runtime: str = "torch"  # what the report's latency is timed in (report.latency.runtime, resolved)

    def close(self) -> None:
        """Free the run folder for other processes (`finish` does; `prune()` also when a stage fails)."""
        if self.opened is not None:
            self.opened.close()

    def test(self) -> dict:
        """The model's loss and metrics on the test set (read for the report only: it chooses nothing)."""
        return evaluate(self.model, self.loaders.test, device=self.device, task=self.task)

    def metric(self) -> float:
        """The task's headline metric on the test set (classification: top-1 accuracy)."""
        return self.test()[self.task.metric]


def prepare(model: nn.Module, loaders, recipe: Recipe, *, run_dir=None, resume: bool = False, force: bool = False,
            progress: bool = True, example_input: torch.Tensor | None = None, model_info: dict | None = None,
            input_fn: Callable | None = None, output_fn: Callable | None = None,
            task: Task = CLASSIFICATION) -> PruneRun:
    """Stage 1: check the run folder, the data and the model against each other (before any training), copy the
    model to the device, make the run folder, and measure the dense model (cost, test accuracy)."""
    dev = resolve_device(recipe.device)
    if run_dir is not None:  # fail now (a bad folder, or one another process holds); nothing is deleted yet
        dist.from_main(lambda: check_run_dir(run_dir, resume=resume, force=force))
    if recipe.prune.reference:  # the file now (its groups once the model is gated): before any folder is made
        read_reference(recipe.prune.reference)
    loaders = as_loaders(loaders, seed=recipe.seed)
    check_first_batches(loaders, task, ("train", "search_t", "search_v"))
    started = time.perf_counter()
    source, model = model, copy.deepcopy(model).to(dev)
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = dist.convert_sync_bn(model)
    io_hooks = attach_io(model, input_fn, output_fn, logits=task.name == "classification")
    x = example_input.to(dev) if example_input is not None else _example_input(loaders, dev, task=task)
    check_first_batches(loaders, task, ("test",), read=False)  # its first batch: checked as it is first evaluated
    loaders = check_data(loaders, model_outputs(model, x, task), task)
    report_runtime = (resolve_runtime(recipe.report.latency.runtime, dev, "report.latency.runtime")
                      if recipe.report.latency else "torch")  # a missing extra fails here, before training
    rd = RunDir(run_dir) if run_dir is not None else None
    # the folder locked for this run, checked against what it started from, made or resumed (rank 0)
    opened = open_run(run_dir, recipe, resume=resume, force=force, model=source, loaders=loaders) if rd else None
    try:
        torch.manual_seed(recipe.seed)
        run = PruneRun(recipe=recipe, method=get_method(recipe.search.method), device=dev, loaders=loaders,
                       model=model, example=x.float(), task=task, run_dir=rd, resume=resume, progress=progress,
                       model_info=model_info, io_hooks=io_hooks, started=started, opened=opened,
                       report_runtime=report_runtime)
        run.cost_before = macs_and_params(model, (1, *x.shape[1:]))
        run.accuracy["dense"] = run.metric()
        if recipe.finetune.distill is not None or recipe.report.latency:
            run.dense_model = copy.deepcopy(model).eval().requires_grad_(False)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    return run


def search(run: PruneRun) -> None:
    """Stage 2: attach the gates and run the method's phase before the cut: a search learns α (its scores are
    `search.score` of the result), a baseline trains and/or scores channels (some decide the keep masks)."""
    recipe, method = run.recipe, run.method
    kw = dict(device=run.device, run_dir=run.run_dir, resume=run.resume, progress=run.progress)
    if method.has_alpha or method.name in REGULARIZED:  # the searches and slimming: a WidthSearch runs them
        found = search_width(run.model, run.loaders, recipe, example_input=run.example, task=run.task, **kw)
        found.take_final_weights()
        run.width_search = found
        run.gates, run.selection, run.search_phase = found.gates, found.selection, found.result
        run.scores = found.scores()
        run.note = found.note or _search_note(method, recipe)
    else:
        run.gates, run.selection = _attach(run.model, run.example, recipe)
        out = method.run(run.model, run.gates, run.loaders, recipe, **kw, **_task_kw(method, run.task))
        run.scores = run.gates.entry_scores(out.scores) if out.scores is not None else None  # per α entry
        run.keep, run.search_phase, run.note = out.keep, out.fit, out.note
    run.accuracy["searched"] = run.metric()


def select(run: PruneRun) -> None:
    """Stage 3: the keep masks from the scores under the recipe's mode (ratio, budget, ℓ1), made once (a latency
    budget times the cut) and the same on every rank; the test accuracy with the losers masked."""
    if run.keep is None and run.width_search is not None:
        run.keep = run.width_search.select(scores=run.scores)  # rank 0's masks on every rank
    elif run.keep is None:
        sel, scores, x = run.selection, run.scores, run.example

        def choose():
            return sel.finish(scores, sel.select(scores), x)

        run.keep = dist.from_main(lambda: [k.cpu() for k in choose()]) if dist.active() else choose()
    with run.gates.masked(run.keep):
        run.accuracy["masked"] = run.metric()


def remove(run: PruneRun) -> None:
    """Stage 4: fold the gates into the weights and remove the losing channels for real; the slim model's output
    must equal the masked one's."""
    if run.width_search is not None:
        run.spec = run.width_search.remove(run.keep)
    else:
        run.spec = remove_checked(run.gates, run.keep, run.model, run.example)
    run.model = run.model.to(memory_format=torch.contiguous_format)
    run.cost_after = macs_and_params(run.model, (1, *run.example.shape[1:]))
    run.accuracy["slim_stale_bn"] = run.metric()  # the statistics of the network before the cut


def recalibrate(run: PruneRun) -> None:
    """Stage 5: re-estimate the cut network's BatchNorm statistics on `prune.recalibrate` training batches."""
    run.recalibrated = recalibrate_bn(run.model, run.loaders.train, run.recipe.prune.recalibrate, device=run.device,
                                      channels_last=run.recipe.finetune.channels_last, task=run.task)
    stale = run.accuracy["slim_stale_bn"]
    run.accuracy["slim_before_finetune"] = run.metric() if run.recalibrated else stale
    run.accuracy["recalibrated_batches"] = run.recalibrated


def finetune(run: PruneRun) -> None:
    """Stage 6: fine-tune the slim model on the whole training set (distilled from the dense one if asked)."""
    d, cfg = run.recipe.finetune.distill, run.recipe.finetune
    distiller = Distiller(run.dense_model, weight=d.weight, temperature=d.temperature).attach(run.model) if d else None
    run.finetune_phase = fit(run.model, run.loaders.train, run.loaders.test, cfg=cfg, device=run.device,
                             run_dir=run.run_dir, phase="finetune", resume=run.resume, progress=run.progress,
                             eval_every=max(1, cfg.epochs // 10), loss_fn=distiller, task=run.task)
    if distiller is not None:
        distiller.detach()
    if not finite_model(run.model):  # the phases check each epoch; this guards the files against anything missed
        raise RuntimeError("the fine-tuned slim model has non-finite weights; nothing was written (lower "
                           "finetune.optim.lr and --resume)")
    run.accuracy["slim_after_finetune"] = run.finetune_phase.final.get(f"test_{run.task.metric}")


def finish(run: PruneRun) -> PruneResult:
    """Stage 7: time the slim model against the dense one (if asked), build the report, write the run folder."""
    recipe, model, x = run.recipe, run.model, run.example
    for handle in run.io_hooks + (run.gates.guards if run.gates is not None else []):  # guards: see _attach
        handle.remove()
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = run.model = dist.revert_sync_bn(model)
    if run.opened is not None and run.opened.finished and run.run_dir is not None:
        return _finished(run, model)
    speed = None
    if recipe.report.latency and dist.is_main():  # timed once; the report is rank 0's
        batch = getattr(run.loaders.train, "batch_size", None) or x.shape[0]
        runtime = run.report_runtime
        sessions: dict = {}  # each model exported once for all batch sizes
        speed = speed_report(run.dense_model, model, tuple(x.shape[1:]), recipe.report, run.device, batch,
                             (run.cost_before[0], run.cost_after[0]), runtime=runtime_record(runtime),
                             times=functools.partial(time_in, runtime, sessions=sessions))
    run.dense_model = None
    fine = run.finetune_phase
    report = build_report(method=run.method, recipe=recipe, gates=run.gates, keep=run.keep, spec=run.spec,
                          cost_before=run.cost_before, cost_after=run.cost_after, input_size=[1, *x.shape[1:]],
                          accuracy=run.accuracy, test_loss=fine.final.get("test_loss"), search=run.search_phase,
                          finetune=fine, total_s=time.perf_counter() - run.started, device=run.device, note=run.note,
                          data=getattr(run.loaders, "info", None),
                          budget=run.selection.report(run.keep, run.cost_after), latency=speed,
                          history=run.run_dir.history() if run.run_dir is not None and dist.is_main() else None)
    task = run.task
    report["task"] = {"name": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
                      "test": {k[5:]: v for k, v in fine.final.items() if k.startswith("test_")}}
    if run.run_dir is not None and dist.is_main():
        _write_run(run, report)
    report = dist.broadcast_object(report)  # every rank returns rank 0's report
    run.close()
    logger.info("pruned with %s: MACs -%.1f%%, params -%.1f%%, test %s %.2f%% (dense %.2f%%)", run.method.name,
                100 * report["macs"]["reduction"], 100 * report["params"]["reduction"], run.task.metric,
                100 * (run.accuracy["slim_after_finetune"] or 0.0), 100 * run.accuracy["dense"])
    model.eval()
    return PruneResult(model=model, report=report, width_spec=run.spec)


def _finished(run: PruneRun, model: nn.Module) -> PruneResult:
    """A resume of a run that had finished: the stages replayed from its checkpoints made the same slim model, so
    the run folder is left as it was (slim.pt, and the report with the times it measured), but for the report's
    `settings_history`, which now lists this resume too; that report is returned."""
    report = None
    if dist.is_main():
        report = run.run_dir.read_json("report.json", "the finished run's report")
        report["settings_history"] = run.run_dir.history()
        run.run_dir.write_json("report.json", report)
    report = dist.broadcast_object(report)
    run.dense_model = None
    run.close()
    logger.info("%s had finished: its slim.pt and report (times included) are left as they were", run.run_dir.path)
    model.eval()
    return PruneResult(model=model, report=report, width_spec=run.spec)


def _write_run(run: PruneRun, report: dict) -> None:
    """slim.pt, width_spec.json, alphas.json (the scores the cut ranked by, named by the method's record) and
    report.json."""
    rd, spec = run.run_dir, run.spec
    save_slim(rd / "slim.pt", run.model, spec, run.model_info)
    rd.write_json("width_spec.json", dict(spec, model=run.model_info))
    kind = run.method.score_name or run.recipe.search.score
    scores = [a.detach().cpu().tolist() for a in run.scores] if run.scores is not None else []
    rd.write_json("alphas.json", {"groups": [g["name"] for g in report["groups"]], "score": kind, "alphas": scores},
                  indent=None)
    rd.write_json("report.json", report)


def prune(model: nn.Module, loaders, ratio: float | None = None, *, budget: dict | None = None, mode: str | None = None,
          method: str | None = None, scope: str | list[str] | None = None, search_epochs: int | None = None,
          finetune_epochs: int | None = None, config: Recipe | dict | None = None,
          device: str | torch.device | None = None, run_dir: str | Path | None = None, resume: bool = False,
          force: bool = False, progress: bool = True, example_input: torch.Tensor | None = None,
          model_info: dict | None = None, input_fn: Callable | None = None,
          output_fn: Callable | None = None, task: Task | str | None = None, loss_fn: Callable | None = None,
          metric_fn: Callable | None = None) -> PruneResult:
    """Search the width of `model` with RARTS (or another method), remove the losing channels, fine-tune.

    The user's `model` is not modified: a copy is searched and cut. Settings come from `config` (a `Recipe` or its
    dict) with the keyword arguments on top; defaults are the paper's (160 search + 160 fine-tune epochs).

    Args:
        model: any CNN (`timm`, `torchvision`, the zoo, your own `nn.Module`).
        loaders: a `slimrarts.data.Loaders`, a `(train, test)` pair of DataLoaders (the training set is then split
            into disjoint halves D_t/D_v for the search), or a dict with `train`, `test` (optionally `search_t`,
            `search_v`). The test loader is read only to report accuracies.
        ratio: the share of gated channels to PRUNE (mode `ratio`). budget: what the slim model may KEEP of the
            dense cost (mode `budget`; with mode `l1` a stopping rule): `{"macs": "50%"}`, `{"params": "1.2M"}`,
            `{"latency": "3.5ms", "batch_size": 1}` or a full `prune.budget` section.
        mode: `ratio`, `budget` or `l1` (a proximal ℓ1 step on α; channels at 0 are pruned). method: a registered
            method (`slimrarts.methods.list_methods()`): `rarts` (default), `darts1`, ..., `slimming`, `random`.
        scope: the gated channels: `internal`, `branch-input`, `coupled` (or a list). search_epochs,
            finetune_epochs: `search.epochs`, `finetune.epochs`. device: `auto`, `cpu`, `cuda`, ...
        run_dir: checkpoints, `metrics.jsonl`, `report.json`, `width_spec.json`, `alphas.json`, `slim.pt` go here,
            with the run's record (`recipe.yaml`, `fingerprint.json`, `settings_history.json`); the folder is locked
            for this call. `resume=True` continues an interrupted run (from the same model and data: checked),
            `force=True` replaces an earlier one.
        example_input: images to trace the model with (default: the first 8 of D_t; the channel groups come from one
            eval-mode forward of its first 2, the removal check and reports use all). model_info: `{"name", "kwargs",
            "num_classes"}` recorded in `slim.pt` for `slimrarts.load` (default: inferred for models built by
            `create_model`, timm or torchvision, verified by rebuilding; none when unsure). input_fn / output_fn:
            build the model's input from a batch tensor (a dict is passed as keywords) / read the [batch, classes]
            logits from its output (default: a tensor, `.logits`, a dict's `logits` or first value, a tuple's first
            element).
        task: what the model learns (`slimrarts.engine.task`): `classification` (default; or the recipe's
            `task.name`), `segmentation`, `detection`, or an object with the methods of `engine.task.Task` (e.g. a
            subclass of a built-in one). It says how batches split, the loss every phase trains with (the search's
            two weight copies and α, Taylor's gradients, BN recalibration, fine-tuning), the metrics evaluated and
            reported (`report["task"]`; `report["accuracy"]` holds the headline metric stage by stage).
        loss_fn / metric_fn: shortcuts for a user's own: `loss_fn(output, target) -> scalar` (train-mode output),
            `metric_fn(output, target) -> float` (eval-mode output, averaged over samples, reported as `metric`).

    Returns:
        A `PruneResult`: `model` (the slim, fine-tuned plain `nn.Module`, in eval mode), `report`
        (`slimrarts.report.build_report`) and `width_spec` (per-group kept channels, per-layer widths).

    Raises:
        ValueError: before any training, a bad setting (naming the key and what is allowed), a model or data that
            cannot be used (frozen, half precision, channels, labels outside the outputs, too few samples), nothing
            to prune, a run folder that cannot be used as asked; after the cut, a removal that changed the output.
        TypeError: `model` is not an `nn.Module`, or `loaders` has an unsupported type.
        DivergenceError: a loss, weight or α became non-finite; nothing of that epoch is saved and the last good
            checkpoint stays for `--resume`.
        RunLockedError: another live process holds `run_dir`.
        ResumeMismatchError: `resume` with another model, other starting weights, other data or other versions
            than the run started from (named), or changed settings for a finished run.

    Under torchrun (after `slimrarts.engine.dist.init()`) call it on every rank with the same arguments: each trains
    on its shard of every batch, the selection is made once, rank 0 alone writes, every rank returns the same.
    The stages (`prepare` ... `finish`, ARCHITECTURE.md) can also be called one by one.

    Example:
        >>> result = slimrarts.prune(model, (train_loader, test_loader), ratio=0.4,  # doctest: +SKIP
        ...                          search_epochs=20, finetune_epochs=20)
    """
    check_model(model)
    recipe = _resolve_recipe(config, ratio=ratio, budget=budget, mode=mode, method=method, scope=scope,
                             search_epochs=search_epochs, finetune_epochs=finetune_epochs, device=device)
    task = resolve_task(task, recipe, loss_fn=loss_fn, metric_fn=metric_fn)
    run = prepare(model, loaders, recipe, run_dir=run_dir, resume=resume, force=force, progress=progress,
                  example_input=example_input, input_fn=input_fn, output_fn=output_fn, task=task,
                  model_info=model_info if model_info is not None else infer_model_info(model))
    try:
        search(run)
        select(run)
        remove(run)
        recalibrate(run)
        finetune(run)
        return finish(run)
    finally:
        run.close()


def load(path: str | Path, model: nn.Module | None = None, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a slim model from a `slim.pt` (or a run folder holding one).

    Without `model`, the original architecture is built from the model name and arguments recorded in the file
    (zoo, `timm:`, `torchvision:`); with it, that model is cut (see `slimrarts.width.load_slim`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "slim.pt"
    return load_slim(path, model=model, map_location=map_location, build=create_model)
