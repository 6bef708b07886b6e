"""`prune()`: gate → search on D_t/D_v → select → fold and remove → fine-tune → evaluate → report."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .baselines import reference_counts
from .config import to_dict
from .data.factory import Loaders, as_loaders
from .engine import dist
from .engine.device import resolve_device
from .engine.distill import Distiller
from .engine.epochs import PhaseResult
from .engine.loop import evaluate, fit
from .engine.recalibrate import recalibrate_bn
from .engine.rundir import RunDir, check_run_dir, prepare_run_dir
from .engine.step import batches_on
from .methods import MethodInfo, get_method
from .metrics import macs_and_params
from .models import create_model
from .preflight import attach_io, check_data, check_model, finite_model, frozen_layers, model_outputs
from .recipe import Recipe, load_recipe, save_or_check_recipe
from .report import build_report
from .search.base import SearchState
from .search.loop import run_search
from .search.problem import NetProblem, make_state
from .selection import Selection, speed_report
from .width import (
    Gates,
    Skipped,
    attach_gates,
    load_slim,
    prunable_channels,
    remove_channels,
    require_groups,
    save_slim,
)
from .width.scores import init_from_magnitude, search_scores

__all__ = ["PruneResult", "WidthSearch", "load", "prune", "search_width"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneResult:
    """The slim fine-tuned model (a plain nn.Module), the report, and the width spec it was cut to."""

    model: nn.Module
    report: dict
    width_spec: dict

    @property
    def spec(self) -> dict:
        """Deprecated name of `width_spec`."""
        return self.width_spec


@dataclasses.dataclass
class WidthSearch:
    """What `search_width` leaves: the gates (α in `gates.alphas`), the search state (w, y, optimizers) and the
    phase's result (history, times)."""

    gates: Gates
    state: SearchState
    result: PhaseResult
    selection: Selection | None = None  # cost model, budget and limits prepared before the search
    importance: list[torch.Tensor] | None = None  # Σ |α ⊙ ∇_α| over the α-steps (`search.score: grad`)

    def __iter__(self):  # `gates, state, result = search_width(...)` as in slimrarts 0.1
        return iter((self.gates, self.state, self.result))


def _resolve_recipe(config: Recipe | dict | str | None, overrides: dict[str, Any]) -> Recipe:
    if isinstance(config, Recipe):
        base = to_dict(config)
    elif isinstance(config, dict):
        base = copy.deepcopy(config)
    elif config is None:
        base = {}
    else:
        base = config
    items = [f"{k}={json.dumps(v)}" for k, v in overrides.items() if v is not None]
    return load_recipe(base, items)


def _budget_section(budget: dict) -> dict:
    """`{"macs": "50%"}` (one kind: its target) or a full `prune.budget` mapping, as the recipe section."""
    if not isinstance(budget, dict):
        raise TypeError(f"budget must be a dict such as {{'macs': '50%'}}, got {type(budget).__name__} {budget!r}")
    kinds = [k for k in ("macs", "params", "latency") if k in budget]
    if len(kinds) > 1:
        raise ValueError(f"budget names {' and '.join(kinds)}: give one kind ({{'macs': '50%'}})")
    if kinds:
        out = {k: v for k, v in budget.items() if k != kinds[0]}
        return {**out, "kind": kinds[0], "target": budget[kinds[0]]}
    return dict(budget)


def _example_input(loaders: Loaders, device: torch.device, n: int = 8) -> torch.Tensor:
    """The first images of D_t, as the loader gives them (the pre-flight checks read their dtype); in a process
    group, rank 0's, so gates, checks and reports see the same input on every rank."""
    def first() -> torch.Tensor:
        for x, _ in batches_on(loaders.search_t, device):
            return x[:n].contiguous()
        raise ValueError("the search loader yields no batches")

    if not dist.active():
        return first()
    return dist.from_main(lambda: first().cpu()).to(device)


@torch.no_grad()
def _take_final_weights(model: nn.Module, state: SearchState, which: str) -> None:
    """Put the weights the slim model is cut from into `model`: w (already there), y, or their mean."""
    if which == "w" or state.y is None:
        return
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for k, y in state.y.items():  # the trained parameters (frozen ones are shared by both nets)
        params[k].copy_(y if which == "y" else (params[k] + y) / 2)
    for k, b in buffers.items():
        other = state.y_buffers[k]
        if which == "y" or not b.is_floating_point():
            b.copy_(other)
        else:
            b.copy_((b + other) / 2)


def _check_gates(gates: Gates, recipe: Recipe) -> None:
    """Fail before any training when the gated model cannot meet the recipe (budgets: `Selection.prepare`)."""
    p = recipe.prune
    require_groups(gates, p.scope)
    if p.mode == "ratio" and not p.reference:
        total = gates.num_channels
        prunable = prunable_channels(gates.groups, p.min_channels)
        if round(p.ratio * total) > prunable:
            raise ValueError(f"prune.ratio={p.ratio} asks for {round(p.ratio * total)} of {total} gated channels, but "
                             f"prune.min_channels={p.min_channels} leaves only {prunable} prunable")
    if p.reference:
        reference_counts(p.reference, gates)


def _attach(model: nn.Module, x: torch.Tensor, recipe: Recipe) -> tuple[Gates, Selection]:
    """Gates on `model` for the recipe's scopes (frozen layers left out, each listed with the reason) and the
    selection prepared for them; everything here fails before any training."""
    frozen = frozen_layers(model)
    gates = attach_gates(model, x[:2], recipe.prune.scope, ignored=[m for _, m in frozen])
    gates.skipped.extend(Skipped(name, "frozen: its weight does not require grad, so it is not trained or pruned",
                                 channels=m.weight.shape[0]) for name, m in frozen)
    _check_gates(gates, recipe)
    return gates, Selection.prepare(gates, recipe, tuple(x.shape[1:]), x.device)


def search_width(model: nn.Module, loaders, recipe: Recipe, *, device: torch.device, run_dir: Path | None = None,
                 resume: bool = False, progress: bool = True,
                 example_input: torch.Tensor | None = None) -> WidthSearch:
    """Attach gates to `model` (in place) and learn α with the recipe's search method.

    Returns a `WidthSearch` (gates, search state, phase result); `model` holds w afterwards.
    """
    loaders = as_loaders(loaders, seed=recipe.seed)
    s, p = recipe.search, recipe.prune
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    x = example_input if example_input is not None else _example_input(loaders, device).float()
    gates, selection = _attach(model, x, recipe)
    if s.init == "magnitude":  # before the copy y is made: both nets start from the same rescaled weights
        init_from_magnitude(gates)
    problem = NetProblem(model, gates.alphas, amp=s.amp, l1=p.l1 if p.mode == "l1" else 0.0,
                         penalty=selection.penalty())
    if s.score == "grad":
        problem.importance = [torch.zeros_like(a, requires_grad=False) for a in gates.alphas]
    callbacks = [cb for cb in (selection.stopping_rule(), selection.shrink_callback(problem)) if cb is not None]
    state = make_state(model, gates.alphas, s.method, optim_w=s.optim, optim_y=s.optim_y, arch_optim=s.arch,
                       lam=s.lam, beta=s.beta, xi=s.xi, grad_clip=s.grad_clip)
    result = run_search(problem, state, s.method, epochs=s.epochs, optim_w=s.optim, optim_y=s.optim_y,
                        optim_arch=s.arch, loader_t=loaders.search_t, loader_v=loaders.search_v,
                        loader_whole=loaders.train, channels_last=s.channels_last, run_dir=run_dir, resume=resume,
                        progress=progress, log_every=s.log_every, cuda_graph=s.cuda_graph,
                        callbacks=callbacks)
    return WidthSearch(gates, state, result, selection, problem.importance)


def _search_note(method: MethodInfo, recipe: Recipe) -> str:
    """The method's source, and what this run changed in it (a magnitude start makes it a hybrid)."""
    s = recipe.search
    parts = []
    if s.init == "magnitude":
        parts.append("hybrid: α started from the per-group normalised magnitude (|γ|), layers rescaled")
    if s.score != "alpha":
        parts.append({"alpha_gamma": "channels ranked by |α·γ|", "grad": "channels ranked by Σ|α ⊙ ∇_α|"}[s.score])
    return "; ".join([method.source, *parts]) if parts else ""


def _scores_and_keep(method: MethodInfo, model, loaders, recipe: Recipe, x, *, device, run_dir, resume, progress):
    """Run the method's phase before the cut: (gates, selection, scores per α entry, ready keep masks or None,
    phase result, note)."""
    if method.has_alpha:
        found = search_width(model, loaders, recipe, device=device, run_dir=run_dir, resume=resume,
                             progress=progress, example_input=x)
        _take_final_weights(model, found.state, recipe.search.final_weights)
        scores = search_scores(found.gates, recipe.search.score, found.importance)
        return found.gates, found.selection, scores, None, found.result, _search_note(method, recipe)
    gates, selection = _attach(model, x, recipe)
    out = method.run(model, gates, loaders, recipe, device=device, run_dir=run_dir, resume=resume,
                     progress=progress)
    scores = gates.entry_scores(out.scores) if out.scores is not None else None  # per channel → per α entry
    return gates, selection, scores, out.keep, out.fit, out.note


def _write_run(rd: RunDir, model: nn.Module, spec: dict, report: dict, method: MethodInfo, scores,
               model_info: dict | None, recipe_score: str = "alpha") -> None:
    save_slim(rd / "slim.pt", model, spec, model_info)
    rd.write_json("width_spec.json", dict(spec, model=model_info))
    names = {"slimming": "|gamma|", "random": "random"}
    kind = recipe_score if method.has_alpha else names.get(method.name, method.name)
    rd.write_json("alphas.json", {"groups": [g["name"] for g in report["groups"]], "score": kind,
                                  "alphas": [a.detach().cpu().tolist() for a in scores] if scores is not None else []},
                  indent=None)
    rd.write_json("report.json", report)


def prune(
    model: nn.Module,
    loaders,
    ratio: float | None = None,
    *,
    budget: dict | None = None,
    mode: str | None = None,
    method: str | None = None,
    scope: str | list[str] | None = None,
    search_epochs: int | None = None,
    finetune_epochs: int | None = None,
    config: Recipe | dict | None = None,
    device: str | torch.device | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    example_input: torch.Tensor | None = None,
    model_info: dict | None = None,
    input_fn: Callable | None = None,
    output_fn: Callable | None = None,
) -> PruneResult:
    """Search the width of `model` with RARTS (or another method), remove the losing channels, fine-tune.

    The user's `model` is not modified: a copy is searched and cut. Settings come from `config` with the keyword
    arguments on top; defaults are the paper's (160 search + 160 fine-tune epochs).

    Args:
        model: any CNN (`timm`, `torchvision`, the zoo, your own `nn.Module`).
        loaders: a `slimrarts.data.Loaders`, a `(train, test)` pair of DataLoaders (the training set is then split
            into two disjoint halves D_t/D_v for the search), or a dict with `train`, `test` (and optionally
            `search_t`, `search_v`). The test loader is read only to report accuracies.
        ratio: the share of gated channels to PRUNE (`prune.ratio`, mode `ratio`).
        budget: what the slim model may KEEP of the dense model's cost, instead of a ratio (mode `budget`):
            `{"macs": "50%"}`, `{"params": "1.2M"}`, `{"latency": "3.5ms", "batch_size": 1}`, or the full
            `prune.budget` section (`{"kind": "macs", "target": "50%"}`). With mode `l1`, a stopping rule.
        mode: `ratio` (exact share by |score|) or `l1` (a proximal ℓ1 step on α; channels at 0 are pruned).
        method: a registered method (`slimrarts.methods.list_methods()`): `rarts` (default), `darts1`, ...,
            or a baseline such as `slimming`, `random`.
        scope: which channels are gated: `internal`, `branch-input`, `coupled` (or a list).
        search_epochs, finetune_epochs: `search.epochs`, `finetune.epochs`.
        config: a `Recipe` or its dict (sections `search`, `prune`, `finetune`, `seed`, `device` are used).
        device: `auto`, `cpu`, `cuda`, ... (`device` of the recipe otherwise).
        run_dir: write checkpoints, `metrics.jsonl`, `report.json`, `width_spec.json`, `alphas.json` and
            `slim.pt` here; `resume=True` continues an interrupted run, `force=True` replaces an earlier one.
        progress: show progress bars.
        example_input: an input batch to trace the model with (default: the first batch of D_t).
        model_info: `{"name", "kwargs", "num_classes"}` recorded in `slim.pt` so `slimrarts.load` can rebuild it.
        input_fn: builds the model's input from a batch tensor (a dict is passed as keyword arguments), for
            models that do not take one tensor.
        output_fn: reads the [batch, classes] logits from the model's output; by default a tensor, a `.logits`
            field, a dict's `logits` (else first value) or a tuple's first element (GoogLeNet, Inception-v3).

    Returns:
        A `PruneResult`: `model` (the slim, fine-tuned plain `nn.Module`, in eval mode), `report` (see
        `slimrarts.report.build_report`) and `width_spec` (per-group kept channels, per-layer widths).

    Raises:
        ValueError: before any training: a bad setting (naming the key and what is allowed), a model that cannot
            be trained here (frozen, half precision, meta device) or cannot read the data (channels, dtype), labels
            outside the model's outputs, too few training samples, nothing to prune, a run folder that cannot
            be used as asked; after the cut: a removal that would change the model's output.
        TypeError: `model` is not an `nn.Module`, or `loaders` has an unsupported type.

    In a process group (e.g. under torchrun, after `slimrarts.engine.dist.init()`), call it on every rank with the
    same arguments: each trains on its shard of every batch, gradients are averaged across the ranks, the selection
    is made once, rank 0 alone writes `run_dir`, and every rank returns the same report and slim model.
        DivergenceError: a loss, weight or α became non-finite; nothing of that epoch is saved (no `slim.pt`,
            no report) and the last good checkpoint stays for `--resume`.

    Example:
        >>> import slimrarts, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> result = slimrarts.prune(model, (train_loader, test_loader), ratio=0.4,  # doctest: +SKIP
        ...                          search_epochs=20, finetune_epochs=20)
        >>> result.report["macs"]["reduction"]  # doctest: +SKIP
    """
    check_model(model)
    scope_list = [scope] if isinstance(scope, str) else scope
    if budget is not None:
        if ratio is not None:
            raise ValueError("give ratio (the share of channels to prune) or budget (what the slim model keeps of "
                             "the dense cost), not both")
        budget = _budget_section(budget)
        mode = mode or "budget"
    recipe = _resolve_recipe(config, {"prune.ratio": ratio, "prune.budget": budget, "prune.mode": mode,
                                      "search.method": method,
                                      "prune.scope": scope_list, "search.epochs": search_epochs,
                                      "finetune.epochs": finetune_epochs,
                                      "device": str(device) if device is not None else None})
    dev = resolve_device(recipe.device)
    if run_dir is not None:  # fail now; nothing is deleted before the checks below
        dist.from_main(lambda: check_run_dir(run_dir, resume=resume, force=force))
    loaders = as_loaders(loaders, seed=recipe.seed)
    info = get_method(recipe.search.method)
    t_total = time.perf_counter()
    model = copy.deepcopy(model).to(dev)
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = dist.convert_sync_bn(model)
    io_hooks = attach_io(model, input_fn, output_fn)
    x = example_input.to(dev) if example_input is not None else _example_input(loaders, dev)
    loaders = check_data(loaders, model_outputs(model, x))
    x = x.float()
    rd = RunDir(run_dir) if run_dir is not None else None
    if rd is not None:  # rank 0 alone makes the folder and writes; every rank gets its error, if any
        dist.from_main(lambda: (prepare_run_dir(run_dir, resume=resume, force=force),
                                save_or_check_recipe(recipe, rd.path, resume)))
    torch.manual_seed(recipe.seed)
    input_size = (1, *x.shape[1:])
    cost_before = macs_and_params(model, input_size)
    dense = evaluate(model, loaders.test, device=dev)
    d = recipe.finetune.distill
    keep_dense = d is not None or recipe.report.latency
    dense_model = copy.deepcopy(model).eval().requires_grad_(False) if keep_dense else None  # teacher, timing
    gates, selection, scores, keep, search, note = _scores_and_keep(info, model, loaders, recipe, x, device=dev,
                                                                    run_dir=rd, resume=resume, progress=progress)
    searched = evaluate(model, loaders.test, device=dev)
    if keep is None and dist.active():  # made once (a latency budget times the cut), the same on every rank
        keep = dist.from_main(lambda: [k.cpu() for k in selection.finish(scores, selection.select(scores), x)])
    elif keep is None:
        keep = selection.finish(scores, selection.select(scores), x)
    with gates.masked(keep):
        masked = evaluate(model, loaders.test, device=dev)
    spec = remove_channels(gates, keep, check_input=x.float())
    if spec["max_abs_diff"] > 1e-3 * max(1.0, spec["max_abs_ref"]):
        raise RuntimeError(f"channel removal changed the model's output (max |Δ| {spec['max_abs_diff']:.3g} against "
                           f"outputs up to {spec['max_abs_ref']:.3g}); please report this model: the slim model "
                           "would not be the searched one")
    model = model.to(memory_format=torch.contiguous_format)
    cost_after = macs_and_params(model, input_size)
    slim_stale = evaluate(model, loaders.test, device=dev)  # the statistics of the network before the cut
    recalibrated = recalibrate_bn(model, loaders.train, recipe.prune.recalibrate, device=dev,
                                  channels_last=recipe.finetune.channels_last)
    slim_before = evaluate(model, loaders.test, device=dev) if recalibrated else slim_stale
    distiller = Distiller(dense_model, weight=d.weight, temperature=d.temperature).attach(model) if d else None
    fine = fit(model, loaders.train, loaders.test, cfg=recipe.finetune, device=dev, run_dir=rd, phase="finetune",
               resume=resume, progress=progress, eval_every=max(1, recipe.finetune.epochs // 10), loss_fn=distiller)
    if distiller is not None:
        distiller.detach()
    if not finite_model(model):  # the phases check each epoch; this guards the files against anything they missed
        raise RuntimeError("the fine-tuned slim model has non-finite weights; nothing was written (lower "
                           "finetune.optim.lr and --resume)")
    for handle in io_hooks:
        handle.remove()
    speed = None
    if recipe.dist.sync_bn and dist.world_size() > 1:
        model = dist.revert_sync_bn(model)
    if recipe.report.latency and dist.is_main():  # timed once; the report is rank 0's
        batch = getattr(loaders.train, "batch_size", None) or x.shape[0]
        speed = speed_report(dense_model, model, tuple(x.shape[1:]), recipe.report, dev, batch,
                             (cost_before[0], cost_after[0]))
    del dense_model
    accuracy = {"dense": dense["acc"], "searched": searched["acc"], "masked": masked["acc"],
                "slim_stale_bn": slim_stale["acc"], "slim_before_finetune": slim_before["acc"],
                "slim_after_finetune": fine.final.get("test_acc"), "recalibrated_batches": recalibrated}
    report = build_report(method=info, recipe=recipe, gates=gates, keep=keep, spec=spec, cost_before=cost_before,
                          cost_after=cost_after, input_size=list(input_size), accuracy=accuracy,
                          test_loss=fine.final.get("test_loss"), search=search, finetune=fine,
                          total_s=time.perf_counter() - t_total, device=dev, note=note,
                          data=getattr(loaders, "info", None), budget=selection.report(keep, cost_after),
                          latency=speed)
    if rd is not None and dist.is_main():
        _write_run(rd, model, spec, report, info, scores, model_info, recipe.search.score)
    report = dist.broadcast_object(report)  # every rank returns rank 0's report
    logger.info("pruned with %s: MACs -%.1f%%, params -%.1f%%, test acc %.2f%% (dense %.2f%%)", info.name,
                100 * report["macs"]["reduction"], 100 * report["params"]["reduction"],
                100 * (accuracy["slim_after_finetune"] or 0.0), 100 * dense["acc"])
    model.eval()
    return PruneResult(model=model, report=report, width_spec=spec)


def load(path: str | Path, model: nn.Module | None = None, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a slim model from a `slim.pt` (or a run folder holding one).

    Without `model`, the original architecture is built from the model name and arguments recorded in the file
    (zoo, `timm:`, `torchvision:`); with it, that model is cut (see `slimrarts.width.load_slim`).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "slim.pt"
    return load_slim(path, model=model, map_location=map_location, build=create_model)
