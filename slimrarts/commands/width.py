"""The width commands behind `slimrarts run` and `slimrarts train` (width recipes): a recipe and a run folder in,
a report out. Benchmarks call these too, so a table row is exactly what the command line would do."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..api import prune
from ..data import Loaders, make_loaders
from ..engine import RunDir, fit, resolve_device
from ..metrics import macs_and_params
from ..models import create_model
from ..recipe import Recipe, save_or_check_recipe

__all__ = ["build_from_recipe", "model_info", "prune_recipe", "train_recipe"]


def model_info(recipe: Recipe, num_classes: int) -> dict:
    """What `slim.pt` and `model.pt` record so that `slimrarts.load` can rebuild the architecture."""
    return {"name": recipe.model.name, "kwargs": recipe.model.kwargs, "num_classes": num_classes}


def build_from_recipe(recipe: Recipe, device: torch.device, channels_last: bool = False) -> tuple[Loaders, torch.nn.Module]:
    """The recipe's loaders and model (seeded; from `model.weights` when set)."""
    loaders = make_loaders(recipe.data, device, seed=recipe.seed, channels_last=channels_last)
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.name, num_classes=loaders.num_classes, **recipe.model.kwargs)
    if recipe.model.weights:
        state = torch.load(recipe.model.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return loaders, model


def prune_recipe(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run the pruning pipeline of `recipe` in `run_dir` (a prepared folder); returns the report."""
    device = resolve_device(recipe.device)
    cl = recipe.search.channels_last or recipe.finetune.channels_last
    loaders, model = build_from_recipe(recipe, device, channels_last=cl)
    result = prune(model, loaders, config=recipe, run_dir=run_dir, resume=resume, progress=progress,
                   model_info=model_info(recipe, loaders.num_classes))
    return result.report


def train_recipe(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train the recipe's model with its `train` section in `run_dir` (a prepared folder); writes `model.pt` and
    `report.json` and returns the report."""
    device = resolve_device(recipe.device)
    rd = RunDir(run_dir)
    save_or_check_recipe(recipe, rd.path, resume)
    loaders, model = build_from_recipe(recipe, device, channels_last=recipe.train.channels_last)
    macs, params = macs_and_params(model, (1, *loaders.info["input_size"]))
    result = fit(model, loaders.train, loaders.test, cfg=recipe.train, device=device, run_dir=rd.path,
                 resume=resume, progress=progress, eval_every=max(1, recipe.train.epochs // 10))
    final = result.final
    info = model_info(recipe, loaders.num_classes)
    model = model.to(memory_format=torch.contiguous_format)
    rd.save_tensors("model.pt", {"state_dict": model.state_dict(), "model": json.dumps(info)})
    report = {"model": info, "data": loaders.info, "params": params, "macs": macs, "epochs": recipe.train.epochs,
              "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
              "train_acc": final.get("train_acc"), "train_s": result.train_s, "wall_s": result.wall_s,
              "images_per_s": result.images_per_s, "device": str(device)}
    rd.write_json("report.json", report)
    return report
