"""Recipes: loading, overrides, inheritance, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from slimrarts.config import ConfigError
from slimrarts.recipe import Recipe, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.joinpath("recipes").rglob("*.yaml"))


def test_defaults_and_overrides():
    r = load_recipe({}, ["train.epochs=3", "train.optim.lr=0.05", "prune.scope=[internal, branch-input]",
                         "data.limit_per_class=null", "search.method=milenas"])
    assert isinstance(r, Recipe)
    assert r.train.epochs == 3 and r.train.optim.lr == 0.05
    assert r.prune.scope == ["internal", "branch-input"]
    assert r.search.method == "milenas"
    assert r.train.optim.milestones == [0.5, 0.75]
    assert load_recipe({}, ["search.beta=1e-4"]).search.beta == 1e-4  # YAML reads 1e-4 as a string


@pytest.mark.parametrize("override, key", [
    ("train.optim.lrr=0.1", "train.optim.lrr"),
    ("trian.epochs=3", "trian"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("data.name=mnist", "data.name"),
    ("train.amp=fp16", "train.amp"),
    ("search.method=darts3", "search.method"),
    ("prune.ratio=1.2", "prune.ratio"),
    ("prune.scope=[coupled, branch-input]", "prune.scope"),
    ("train.optim.milestones=[0.8, 0.5]", "train.optim.milestones"),
    ("device=gpu", "device"),
    ("train.cuda_graph=yes please", "train.cuda_graph"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe({}, [override])


def test_error_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed keys under train.optim: lr, momentum"):
        load_recipe({"train": {"optim": {"lrr": 1}}})


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe({}, ["train.epochs"])


def test_base_inheritance_and_dump(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "b", "train": {"epochs": 7, "optim": {"lr": 0.2}}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "name": "c", "train": {"epochs": 9}}))
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.name, r.train.epochs, r.train.optim.lr) == ("c", 9, 0.2)
    dump_recipe(r, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == r


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_its_model_builds(path):
    from slimrarts.models import create_model

    if path.stem.startswith("darts"):
        from slimrarts.nas import DARTS_V2, SearchNetwork, build_eval_net
        from slimrarts.nas.recipe import NasRecipe

        r = load_recipe(path, schema=NasRecipe)
        assert r.name and r.search.epochs >= 1
        net = SearchNetwork(C=r.net.C, num_classes=10, layers=r.net.layers, steps=r.net.steps)
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        evaluation = build_eval_net(DARTS_V2, C=r.train.C, layers=r.train.layers,
                                    auxiliary=r.train.auxiliary_weight > 0)
        assert sum(p.numel() for p in evaluation.parameters()) > 0
        return
    r = load_recipe(path)
    assert r.name
    model = create_model(r.model.name, num_classes=100 if r.data.name == "cifar100" else 10, **r.model.kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "width").glob("paper_cifar*_*.yaml")),
                         ids=lambda p: p.stem)
def test_width_paper_recipes_have_the_papers_settings(path):
    """Network Slimming's schedule (RARTS §IV-B follows it): SGD batch 64, lr 0.1 ÷10 at 50%/75%, wd 1e-4, 160+160."""
    r = load_recipe(path)
    method, ratio = path.stem.split("_")[-1].rstrip("0123456789"), int(path.stem[-2:]) / 100
    assert (r.model.name, r.data.batch_size, r.search.method, r.prune.ratio) == (
        "preresnet164", 64, method, ratio)
    assert r.data.name == path.stem.split("_")[1]
    for phase in (r.search, r.finetune):
        o = phase.optim
        assert (phase.epochs, o.lr, o.momentum, o.weight_decay, o.schedule, o.milestones, o.gamma) == (
            160, 0.1, 0.9, 1e-4, "step", [0.5, 0.75], 0.1)
    assert r.prune.scope == ["internal", "branch-input"]
    if method == "slimming":
        assert (r.baselines.sparsity, r.baselines.init_gamma) == (1e-5, 0.5)
