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


def _resolves(schema: type, dotted: str) -> bool:
    """Whether `dotted` names a field of the recipe schema (through nested and optional sections)."""
    import dataclasses
    import typing

    from slimrarts.config import _config_classes

    cls = schema
    *parents, last = dotted.split(".")
    for part in parents:
        hints = typing.get_type_hints(cls)
        if part not in hints or not _config_classes(hints[part]):
            return False
        cls = _config_classes(hints[part])[0]
    return last in {f.name for f in dataclasses.fields(cls)}


def _schemas():
    from slimrarts.nas.recipe import NasRecipe

    return [Recipe, NasRecipe]


@pytest.mark.parametrize("schema", _schemas(), ids=lambda s: s.__name__)
def test_every_resume_safe_key_is_a_field_of_its_schema(schema):
    """RESUME_SAFE is generated from `field(..., resume_safe=True)`: it names real fields only (a hand list once
    advised `finetune.grad_clip`, which no schema has), and the learning rates, λ, β, μ and clipping are in it."""
    from slimrarts.config import resume_safe_keys
    from slimrarts.recipe import RESUME_SAFE

    keys = resume_safe_keys(schema)
    assert keys and all(_resolves(schema, k) for k in keys), keys
    assert {"search.optim.lr", "search.optim_y.lr", "search.optim_arch.lr", "search.lam", "search.beta",
            "search.grad_clip", "train.optim.lr"} <= set(keys)
    assert "finetune.grad_clip" not in keys and not _resolves(schema, "finetune.grad_clip")
    assert RESUME_SAFE == resume_safe_keys(Recipe)
    assert set(RESUME_SAFE) >= {"finetune.optim.lr", "search.cost.mu"}
    assert set(resume_safe_keys(_schemas()[1])) >= {"cost.mu", "train.grad_clip"}


def test_the_divergence_hint_names_only_resume_safe_fields():
    """For each phase a recipe runs (its search, training and fine-tuning sections), the settings the divergence
    message advises changing on resume (`--set KEY=<smaller>`) exist in that schema and a resume accepts them."""
    import re

    from slimrarts.config import resume_safe_keys
    from slimrarts.engine.epochs import _divergence
    from slimrarts.engine.fit import _Training
    from slimrarts.nas.recipe import NasRecipe

    def named(err) -> list[str]:
        return re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", err.setting)

    nan = float("nan")
    checked = 0
    for schema, sections in ((Recipe, ("search", "train", "finetune")), (NasRecipe, ("search", "train"))):
        recipe, safe = schema(), set(resume_safe_keys(schema))
        for key in sections:
            cfg = getattr(recipe, key)
            # fit's phase for training sections; the search phase has no `cfg` (it always has search.grad_clip)
            phase = _Training(None, None, None, None, None, cfg, None, 1, 1) if key != "search" else object()
            clips = getattr(phase, "clips_gradients", True)
            for fields in ({"train_loss": nan}, {"alpha_mean": nan}):
                if "alpha_mean" in fields and key != "search":
                    continue
                err = _divergence("p", 0, fields, [], key, clips)
                keys = named(err)
                assert keys and all(k in safe for k in keys), (schema.__name__, key, err.setting)
                checked += len(keys)
    assert checked >= 9
    finetune = _Training(None, None, None, None, None, Recipe().finetune, None, 1, 1)
    plain = _divergence("p", 0, {"loss": nan}, [], "finetune", finetune.clips_gradients)
    assert "grad_clip" not in plain.setting  # a width recipe's fine-tuning has no gradient clipping to advise


def test_run_folders_made_with_crop_scales_old_default_resume_and_export_as_they_ran(tmp_path):
    """data.crop_scale's default went from [0.08, 1] to null (the reader's own). Every folder made before holds
    [0.08, 1] whatever its set; only imagefolder read it. Such folders resume under the new default and their
    recipe.yaml still loads (export reads it); a voc folder resumed with an explicit [0.08, 1] — crops it never ran
    with — and any other changed scale are refused."""
    from slimrarts.config import to_dict
    from slimrarts.recipe import read_run_recipe, resume_changes

    def folder(name: str, scale: list[float], task: str = "classification") -> Path:
        out = tmp_path / f"{name}-{scale[0]}"
        out.mkdir()
        raw = to_dict(load_recipe({"data": {"name": name, "root": "x"}, "task": {"name": task}}))
        raw["data"]["crop_scale"] = scale  # as the versions before wrote it
        (out / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return out

    def now(name: str, task: str = "classification", **data) -> Recipe:
        return load_recipe({"data": {"name": name, "root": "x", **data}, "task": {"name": task}})

    for name, task in (("cifar10", "classification"), ("coco", "detection"), ("voc", "segmentation"),
                       ("imagefolder", "classification")):
        old = folder(name, [0.08, 1.0], task)
        assert resume_changes(now(name, task), old) == [], name
        assert read_run_recipe(old / "recipe.yaml").data.crop_scale is None, name
    assert resume_changes(now("imagefolder", crop_scale=[0.08, 1.0]), tmp_path / "imagefolder-0.08") == []
    with pytest.raises(ConfigError, match=r"data.crop_scale: None → \[0.08, 1.0\]"):
        resume_changes(now("voc", "segmentation", crop_scale=[0.08, 1.0]), tmp_path / "voc-0.08")
    with pytest.raises(ConfigError, match=r"data.crop_scale: \[0.5, 1.0\] → None"):
        resume_changes(now("imagefolder"), folder("imagefolder", [0.5, 1.0]))
    assert resume_changes(now("cifar10"), folder("cifar10", [0.5, 1.0])) == []  # never read by cifar
