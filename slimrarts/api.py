"""`prune()`: gate → search on D_t/D_v → select → fold and remove → fine-tune → evaluate → report."""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import to_dict
from .data.factory import Loaders, as_loaders
from .engine.loop import evaluate, fit, resolve_device
from .engine.progress import console
from .engine.rundir import prepare_run_dir
from .engine.step import batches_on
from .metrics import macs_and_params
from .recipe import Recipe, load_recipe, save_or_check_recipe
from .baselines import get_baseline, is_baseline
from .search import get_search
from .search.loop import run_search
from .search.problem import NetProblem, make_state
from .version import __version__
from .width import attach_gates, pruned_ratio, remove_channels, save_slim, select_l1, select_ratio

__all__ = ["PruneResult", "prune", "search_width", "load"]


@dataclasses.dataclass
class PruneResult:
    """The slim fine-tuned model (a plain nn.Module), the report, and the width spec it was cut to."""

    model: nn.Module
    report: dict
    spec: dict


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


def _example_input(loaders: Loaders, device: torch.device, n: int = 8) -> torch.Tensor:
    for x, _ in batches_on(loaders.search_t, device):
        return x[:n].float().contiguous()
    raise ValueError("the search loader yields no batches")


@torch.no_grad()
def _keep_weights(model: nn.Module, state, keep: str) -> None:
    if keep == "w" or state.y is None:
        return
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for k, p in params.items():
        p.copy_(state.y[k] if keep == "y" else (p + state.y[k]) / 2)
    for k, b in buffers.items():
        other = state.y_buffers[k]
        if keep == "y" or not b.is_floating_point():
            b.copy_(other)
        else:
            b.copy_((b + other) / 2)


@dataclasses.dataclass
class _Timing:
    train_s: float
    wall_s: float
    images_per_s: float


def _check_gates(gates, recipe) -> None:
    """Fail before any training when the gated model cannot meet the recipe."""
    p = recipe.prune
    if not gates.groups:
        reasons = "; ".join(f"{k.name}: {k.reason}" for k in gates.skipped) or "no conv/linear channel groups found"
        raise ValueError(f"nothing to prune in this model for scope {p.scope}: {reasons}")
    if p.mode == "ratio" and not p.reference:
        total = gates.num_channels
        prunable = sum(g.size - min(p.min_channels, g.size) for g in gates.groups)
        if round(p.ratio * total) > prunable:
            raise ValueError(f"prune.ratio={p.ratio} asks for {round(p.ratio * total)} of {total} gated channels, but "
                             f"prune.min_channels={p.min_channels} leaves only {prunable} prunable")
    method = recipe.search.method
    if p.reference and method != "random":
        raise ValueError(f"prune.reference only applies to search.method=random, not {method!r}; remove it")
    if p.reference:
        from .baselines.random_pruning import _reference_counts

        _reference_counts(p.reference, gates)
    elif is_baseline(method) and p.mode == "l1":
        raise ValueError(f"prune.mode=l1 learns which α reach zero; baseline {method!r} has no α (use mode ratio, or "
                         "random with prune.reference)")


def search_width(model: nn.Module, loaders, recipe: Recipe, *, device: torch.device, run_dir: Path | None = None,
                 resume: bool = False, progress: bool = True, example_input: torch.Tensor | None = None):
    """Attach gates to `model` (in place) and learn α with the recipe's search method; returns (gates, state, result)."""
    loaders = as_loaders(loaders, seed=recipe.seed)
    s, p = recipe.search, recipe.prune
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    x = example_input if example_input is not None else _example_input(loaders, device)
    gates = attach_gates(model, x[:2], p.scope)
    _check_gates(gates, recipe)
    problem = NetProblem(model, gates.alphas, amp=s.amp, l1=p.l1 if p.mode == "l1" else 0.0)
    state = make_state(model, gates.alphas, s.method, optim_w=s.optim, optim_y=s.optim_y, arch_optim=s.arch,
                       lam=s.lam, beta=s.beta, xi=s.xi, grad_clip=s.grad_clip)
    result = run_search(problem, state, s.method, epochs=s.epochs, optim_w=s.optim, optim_y=s.optim_y,
                        optim_arch=s.arch,
                        loader_t=loaders.search_t, loader_v=loaders.search_v, loader_whole=loaders.train,
                        channels_last=s.channels_last, run_dir=str(run_dir) if run_dir else None, resume=resume,
                        progress=progress, log_every=s.log_every, cuda_graph=s.cuda_graph)
    return gates, state, result


def prune(
    model: nn.Module,
    loaders,
    ratio: float | None = None,
    *,
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
) -> PruneResult:
    """Search the width of `model` with RARTS (or another method), remove the losing channels, fine-tune.

    `loaders` is a `slimrarts.data.Loaders`, a `(train, test)` pair of DataLoaders (the training set is then split
    into two disjoint halves for the search), or a dict. Settings come from `config` (a `Recipe` or its dict; the
    `search`, `prune`, `finetune`, `seed` and `device` sections are used), with the keyword arguments on top;
    defaults are the paper's (160 search + 160 fine-tune epochs). The user's `model` is not modified: a copy is
    searched and cut. With `run_dir`, checkpoints, metrics.jsonl, the report, the width spec and the slim weights
    are written there, and `resume=True` continues an interrupted run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scope_list = [scope] if isinstance(scope, str) else scope
    recipe = _resolve_recipe(config, {"prune.ratio": ratio, "prune.mode": mode, "search.method": method,
                                      "prune.scope": scope_list, "search.epochs": search_epochs,
                                      "finetune.epochs": finetune_epochs,
                                      "device": str(device) if device is not None else None})
    dev = resolve_device(recipe.device)
    loaders = as_loaders(loaders, seed=recipe.seed)
    run_path = prepare_run_dir(run_dir, resume=resume, force=force) if run_dir is not None else None
    if run_path is not None:
        save_or_check_recipe(recipe, run_path, resume)
    torch.manual_seed(recipe.seed)
    method = recipe.search.method
    note = get_search(method).paper if not is_baseline(method) else ""
    t_total = time.perf_counter()
    model = copy.deepcopy(model).to(dev)
    x = (example_input.to(dev) if example_input is not None else _example_input(loaders, dev))
    input_size = (1,) + tuple(x.shape[1:])
    macs0, params0 = macs_and_params(model, input_size)
    dense = evaluate(model, loaders.test, device=dev)
    p = recipe.prune
    if is_baseline(method):
        gates = attach_gates(model, x[:2], p.scope)
        _check_gates(gates, recipe)
        base = get_baseline(method)(model, gates, loaders, recipe, device=dev, run_dir=run_path, resume=resume,
                                    progress=progress)
        scores, keep, note = base.scores, base.keep, base.note
        search = _Timing(base.fit.train_s, base.fit.wall_s, base.fit.images_per_s)
    else:
        gates, state, result = search_width(model, loaders, recipe, device=dev, run_dir=run_path, resume=resume,
                                            progress=progress, example_input=x)
        _keep_weights(model, state, recipe.search.keep)
        scores, keep = gates.alphas, None
        search = _Timing(result.search_s, result.wall_s, result.images_per_s)
    searched = evaluate(model, loaders.test, device=dev)
    if keep is None and p.mode == "ratio":
        keep = select_ratio(scores, p.ratio, min_channels=p.min_channels, round_to=p.round_to)
    elif keep is None:
        keep = select_l1(scores, min_channels=p.min_channels, round_to=p.round_to)
    alphas = [a.detach().cpu().tolist() for a in scores] if scores is not None else []
    groups = gates.summary()
    skipped = [dataclasses.asdict(s) for s in gates.skipped]
    with gates.masked(keep):
        masked = evaluate(model, loaders.test, device=dev)
    spec = remove_channels(gates, keep, check_input=x.float())
    if spec["max_abs_diff"] > 1e-3 * max(1.0, spec["max_abs_ref"]):
        raise RuntimeError(f"channel removal changed the model's output (max |Δ| {spec['max_abs_diff']:.3g} against "
                           f"outputs up to {spec['max_abs_ref']:.3g}); please report this model: the slim model "
                           "would not be the searched one")
    model = model.to(memory_format=torch.contiguous_format)
    macs1, params1 = macs_and_params(model, input_size)
    slim_before = evaluate(model, loaders.test, device=dev)
    fine = fit(model, loaders.train, loaders.test, cfg=recipe.finetune, device=dev, run_dir=run_path,
               phase="finetune", resume=resume, progress=progress, eval_every=max(1, recipe.finetune.epochs // 10))
    final = fine.final
    report = {
        "slimrarts": __version__,
        "method": method,
        "method_note": note,
        "mode": p.mode,
        "scope": p.scope,
        "ratio_requested": p.ratio if p.mode == "ratio" else None,
        "prc": pruned_ratio(keep),
        "gated_channels": gates.num_channels,
        "pruned_channels": sum(int((~k).sum()) for k in keep),
        "params": {"before": params0, "after": params1, "reduction": 1 - params1 / params0},
        "macs": {"before": macs0, "after": macs1, "reduction": 1 - macs1 / macs0, "input_size": list(input_size),
                 "note": "MACs per image; FLOPs = 2 x MACs"},
        "accuracy": {"dense": dense["acc"], "searched": searched["acc"], "masked": masked["acc"],
                     "slim_before_finetune": slim_before["acc"], "slim_after_finetune": final.get("test_acc")},
        "test_loss_final": final.get("test_loss"),
        "removal_max_abs_diff": spec.get("max_abs_diff"),
        "time_s": {"search": search.train_s, "search_wall": search.wall_s, "finetune": fine.train_s,
                   "finetune_wall": fine.wall_s, "total_this_call": time.perf_counter() - t_total},
        "search_images_per_s": search.images_per_s,
        "finetune_images_per_s": fine.images_per_s,
        "groups": [dict(g, kept=len(s["kept"])) for g, s in zip(groups, spec["groups"])],
        "skipped": skipped,
        "layers": spec["layers"],
        "settings": to_dict(recipe),
        "machine": {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                    else platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "final_epoch_note": "accuracies are of the final epoch; the test set chooses nothing",
    }
    if run_path is not None:
        save_slim(run_path / "slim.pt", model, spec, model_info)
        (run_path / "width_spec.json").write_text(json.dumps(dict(spec, model=model_info), indent=1))
        score = "|gamma|" if method == "slimming" else ("random" if method == "random" else "alpha")
        (run_path / "alphas.json").write_text(json.dumps({"groups": [g["name"] for g in groups], "score": score,
                                                          "alphas": alphas}))
        (run_path / "report.json").write_text(json.dumps(report, indent=1))
    if progress:
        from .report import summary_table

        console.print(summary_table(report))
    model.eval()
    return PruneResult(model=model, report=report, spec=spec)


def load(path: str | Path, model: nn.Module | None = None, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a slim model from a `slim.pt` (or a run folder holding one); see `slimrarts.width.load_slim`."""
    from .width import load_slim

    path = Path(path)
    if path.is_dir():
        path = path / "slim.pt"
    return load_slim(path, model=model, map_location=map_location)
