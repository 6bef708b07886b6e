"""The width commands behind `slimrarts run` and `slimrarts train` (width recipes): a recipe and a run folder in,
a report out. Benchmarks call these too, so a table row is exactly what the command line would do."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..api import prune, resolve_task
from ..data import Loaders, make_loaders
from ..engine import RunDir, dist, fit, resolve_device
from ..engine.checkpoint import load_checkpoint
from ..engine.rundir import check_run_dir
from ..engine.task import Task
from ..errors import ConfigError, InputError, MissingFileError, SlimrartsError
from ..metrics import macs_and_params
from ..models import create_model
from ..preflight import check_data, check_model, check_processes, model_outputs
from ..recipe import Recipe
from ..runfolder import open_run

__all__ = ["build_from_recipe", "load_weights", "model_info", "prune_recipe", "start_processes", "train_recipe"]


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load `model.weights` (a `model.pt` of `slimrarts train`, or a plain state_dict file) into `model`, strictly."""
    if not Path(path).is_file():
        raise MissingFileError(f"model.weights: {str(path)!r} does not exist")
    state = load_checkpoint(path, what="weights file (model.weights)",
                            remedy="point model.weights at a model.pt written by slimrarts train, or a state_dict")
    state = state.get("state_dict", state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise InputError(f"model.weights: {str(path)!r} does not fit model {type(model).__name__}: "
                         f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None


def model_info(recipe: Recipe, num_classes: int) -> dict:
    """What `slim.pt` and `model.pt` record so that `slimrarts.load` can rebuild the architecture."""
    return {"name": recipe.model.name, "kwargs": recipe.model.kwargs, "num_classes": num_classes}


def start_processes(recipe: Recipe, sections: tuple[str, ...]) -> torch.device:
    """Join torchrun's process group when this process was launched by it (nothing otherwise), check what the
    recipe `sections` ask of several processes, and return this process's device."""
    dist.init(recipe.device, backend=recipe.dist.backend, timeout_s=recipe.dist.timeout_s)
    device = resolve_device(recipe.device)
    check_processes(recipe, device, sections)
    return device


def build_from_recipe(recipe: Recipe, device: torch.device,
                      channels_last: bool = False) -> tuple[Loaders, torch.nn.Module]:
    """The recipe's loaders (this process's shards in a process group) and model (seeded; from `model.weights` when
    set)."""
    loaders = make_loaders(recipe.data, device, seed=recipe.seed, channels_last=channels_last,
                           per_process=recipe.dist.batch == "process", ignore_index=recipe.task.ignore_index)
    torch.manual_seed(recipe.seed)
    try:
        model = create_model(recipe.model.name, num_classes=loaders.num_classes, **recipe.model.kwargs)
    except TypeError as err:  # a constructor argument the model does not take
        if isinstance(err, SlimrartsError):
            raise
        raise ConfigError(f"model.kwargs={recipe.model.kwargs}: {recipe.model.name} cannot be built with them "
                          f"({err}); see the model's constructor for the arguments it takes") from None
    if recipe.model.weights:
        load_weights(model, recipe.model.weights)
    return loaders, model


def prune_recipe(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    """Run the pruning pipeline of `recipe` in `run_dir`; returns the report. The folder is created (or, with
    `force`, cleared) only after the model and data passed their checks. Under torchrun every process runs it."""
    device = start_processes(recipe, ("search", "finetune"))
    cl = recipe.search.channels_last or recipe.finetune.channels_last
    loaders, model = build_from_recipe(recipe, device, channels_last=cl)
    result = prune(model, loaders, config=recipe, run_dir=run_dir, resume=resume, force=force, progress=progress,
                   model_info=model_info(recipe, loaders.num_classes))
    return result.report


TRAIN_UNREAD = ("search", "baselines", "prune", "finetune")  # recipe sections a dense `slimrarts train` never reads


def train_recipe(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    """Train the recipe's model with its `train` section in `run_dir`; writes `model.pt` and `report.json` and
    returns the report. The folder is created (or, with `force`, cleared) once the model and data are built. Under
    torchrun every process trains its shard and rank 0 writes."""
    device = start_processes(recipe, ("train",))
    dist.from_main(lambda: check_run_dir(run_dir, resume=resume, force=force))
    loaders, model = build_from_recipe(recipe, device, channels_last=recipe.train.channels_last)
    check_model(model)
    task = resolve_task(None, recipe)
    x = task.example(task.split(next(iter(loaders.test)))[0])[:2].float()
    loaders = check_data(loaders, model_outputs(model, x, task), task)
    rd = RunDir(run_dir)
    with open_run(run_dir, recipe, resume=resume, force=force, model=model, loaders=loaders, unread=TRAIN_UNREAD):
        return _train(recipe, model, loaders, rd, device, resume=resume, progress=progress, task=task,
                      example=x[:1])


def _train(recipe: Recipe, model: torch.nn.Module, loaders: Loaders, rd: RunDir, device: torch.device, *,
           resume: bool, progress: bool, task: Task, example: torch.Tensor) -> dict:
    macs, params = macs_and_params(model, tuple(example.shape))
    sync_bn = recipe.dist.sync_bn and dist.world_size() > 1
    if sync_bn:
        model = dist.convert_sync_bn(model.to(device))
    result = fit(model, loaders.train, loaders.test, cfg=recipe.train, device=device, run_dir=rd.path,
                 resume=resume, progress=progress, eval_every=max(1, recipe.train.epochs // 10), task=task)
    final = result.final
    info = model_info(recipe, loaders.num_classes)
    if sync_bn:
        model = dist.revert_sync_bn(model)
    model = model.to(memory_format=torch.contiguous_format)
    report = {"model": info, "data": loaders.info, "params": params, "macs": macs, "epochs": recipe.train.epochs,
              "task": task.name, "metric": task.metric, "test_metric": final.get(f"test_{task.metric}"),
              "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
              "train_acc": final.get("train_acc"), "train_s": result.train_s, "wall_s": result.wall_s,
              "images_per_s": result.images_per_s, "device": str(device), "processes": dist.describe()}
    if dist.is_main():
        report["settings_history"] = rd.history()
        rd.save_tensors("model.pt", {"state_dict": model.state_dict(), "model": json.dumps(info)})
        rd.write_json("report.json", report)
    return report
