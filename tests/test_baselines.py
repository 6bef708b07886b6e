"""Baselines: Network Slimming drives γ down and prunes by one global |γ| threshold; random keeps given counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_loaders

import slimrarts
from slimrarts.baselines.random_pruning import random_keep
from slimrarts.baselines.slimming import bn_l1_subgradient
from slimrarts.models import create_model


def _loaders(tiny_sets):
    return tiny_loaders(tiny_sets)


def _config(method, sparsity=0.0, epochs=3, **prune):
    return {"search": {"method": method, "epochs": epochs, "optim": {"lr": 0.05, "weight_decay": 0.0}},
            "baselines": {"sparsity": sparsity},
            "finetune": {"epochs": 1, "optim": {"lr": 0.05}},
            "prune": {"scope": ["internal", "branch-input"], **prune}}


def test_l1_subgradient_adds_s_sign_gamma():
    w = [torch.tensor([0.5, -0.2, 0.0], requires_grad=True)]
    w[0].grad = torch.tensor([1.0, 1.0, 1.0])
    bn_l1_subgradient(w, 0.1)()
    torch.testing.assert_close(w[0].grad, torch.tensor([1.1, 0.9, 1.0]))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_l1_term_is_exact_under_autocast_and_weight_decay(amp):
    """One SGD step with s and weight decay moves γ by exactly lr·(wd·γ + s·sign γ) more than the bare step."""
    from slimrarts.engine.optim import SGD
    from slimrarts.engine.step import TrainStep

    lr, wd, s = 0.1, 1e-2, 0.05
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    gamma = {}
    for key, (decay, sparsity) in {"bare": (0.0, 0.0), "wd": (wd, 0.0), "wd+l1": (wd, s)}.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4))
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([0.5, -0.3, 0.2, 0.8, -0.6, 0.1]))
        gamma0 = model[1].weight.detach().clone()
        opt = SGD(model.parameters(), lr=lr, weight_decay=decay)
        step = TrainStep(model, opt, device=torch.device("cpu"), amp=amp,
                         after_backward=bn_l1_subgradient([model[1].weight], sparsity))
        step(x, y)
        gamma[key] = model[1].weight.detach().clone()
    torch.testing.assert_close(gamma["bare"] - gamma["wd"], lr * wd * gamma0)
    torch.testing.assert_close(gamma["wd"] - gamma["wd+l1"], lr * s * torch.sign(gamma0))
    assert gamma["bare"].dtype == torch.float32  # autocast leaves the master weights in fp32


def test_slimming_drives_gamma_down_and_prunes_by_global_threshold(tiny_sets, tmp_path):
    loaders = _loaders(tiny_sets)
    reports = {}
    for s in (0.0, 0.05):
        torch.manual_seed(0)
        r = slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.4, config=_config("slimming", s),
                            run_dir=tmp_path / f"s{s}", progress=False)
        reports[s] = r.report
    scores = {s: json.loads((tmp_path / f"s{s}" / "alphas.json").read_text())["alphas"] for s in reports}
    mean = {s: sum(sum(g) for g in v) / sum(len(g) for g in v) for s, v in scores.items()}
    assert mean[0.05] < mean[0.0] < 0.5 + 0.2  # γ starts at 0.5; the ℓ1 term pulls it down
    # exactly 40% of the gated channels go, and they are the ones with the smallest |γ| overall
    flat = sorted((abs(v), gi, ci) for gi, g in enumerate(scores[0.05]) for ci, v in enumerate(g))
    n_prune = round(0.4 * len(flat))
    spec = json.loads((tmp_path / "s0.05" / "width_spec.json").read_text())
    kept = {(gi, ci) for gi, g in enumerate(spec["groups"]) for ci in g["kept"]}
    pruned = {(gi, ci) for _, gi, ci in flat[:n_prune]}
    assert not (pruned & kept) and len(kept) == len(flat) - n_prune
    assert reports[0.05]["method"] == "slimming" and "Network Slimming" in reports[0.05]["method_note"]


def test_random_keeps_the_reference_counts(tiny_sets, tmp_path):
    loaders = _loaders(tiny_sets)
    slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.5, config=_config("rarts", epochs=1),
                    run_dir=tmp_path / "ref", progress=False)
    ref = json.loads((tmp_path / "ref" / "width_spec.json").read_text())
    r = slimrarts.prune(create_model("tiny_preresnet"), loaders, None,
                        config=_config("random", epochs=1, reference=str(tmp_path / "ref")),
                        run_dir=tmp_path / "rnd", progress=False)
    got = json.loads((tmp_path / "rnd" / "width_spec.json").read_text())
    assert [len(g["kept"]) for g in got["groups"]] == [len(g["kept"]) for g in ref["groups"]]
    assert [g["kept"] for g in got["groups"]] != [g["kept"] for g in ref["groups"]]
    assert r.report["prc"] == pytest.approx(0.5, abs=1 / r.report["gated_channels"])


def test_random_keep_counts_and_errors():
    masks = random_keep([5, 8, 3], [2, 8, 1], seed=0)
    assert [int(m.sum()) for m in masks] == [2, 8, 1]
    assert [m.tolist() for m in random_keep([5, 8, 3], [2, 8, 1], seed=0)] == [m.tolist() for m in masks]  # seeded
    assert [m.tolist() for m in random_keep([50], [25], seed=1)] != [m.tolist() for m in random_keep([50], [25], 0)]
    for count in (0, 5):
        with pytest.raises(ValueError, match="cannot keep"):
            random_keep([4], [count], seed=0)
    with pytest.raises(ValueError):  # a count per group: a short list is an error, not a silently shorter result
        random_keep([4, 4], [2], seed=0)


def test_random_at_a_global_ratio_is_seeded_and_trains_no_alpha(tiny_sets, tmp_path):
    """Without a reference: plain training on the whole set (checkpointed as the search phase, α untouched), then
    random scores drawn from the recipe's seed, cut at one global threshold."""
    loaders = _loaders(tiny_sets)
    specs = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.4, config=dict(_config("random", epochs=1),
                            seed=seed), run_dir=tmp_path / run, progress=False)
        specs.append([g["kept"] for g in r.width_spec["groups"]])
        assert r.report["prc"] == pytest.approx(0.4, abs=1 / r.report["gated_channels"])
        assert r.report["method"] == "random" and "global ratio" in r.report["method_note"]
    assert specs[0] == specs[1] and specs[0] != specs[2]
    phases = [json.loads(x)["phase"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["search", "finetune"] and (tmp_path / "a" / "checkpoints" / "search.pt").exists()
    scores = json.loads((tmp_path / "a" / "alphas.json").read_text())
    assert scores["score"] == "random" and all(0 <= v < 1 for g in scores["alphas"] for v in g)


def test_random_reference_of_another_model_is_refused(tiny_sets, tmp_path):
    loaders = _loaders(tiny_sets)
    slimrarts.prune(create_model("tiny_resnet"), loaders, 0.5, config=_config("rarts", epochs=1),
                    run_dir=tmp_path / "ref", progress=False)
    with pytest.raises(ValueError, match="has no group"):
        slimrarts.prune(create_model("tiny_preresnet"), loaders, None,
                        config=_config("random", epochs=1, reference=str(tmp_path / "ref")), progress=False)
    with pytest.raises(FileNotFoundError, match="prune.reference"):
        slimrarts.prune(create_model("tiny_preresnet"), loaders, None,
                        config=_config("random", epochs=1, reference=str(tmp_path / "nowhere")), progress=False)


def test_l1_mode_needs_alpha(tiny_sets):
    with pytest.raises(ValueError, match="mode=l1"):
        slimrarts.prune(create_model("tiny_resnet"), _loaders(tiny_sets), None,
                        config=_config("slimming", epochs=1, mode="l1"), progress=False)


def test_register_baseline():
    from slimrarts import methods
    from slimrarts.baselines import base

    def fn(*args, **kwargs):
        return None

    try:
        assert base.register_baseline("tmp-test")(fn) is fn
        assert base.get_baseline("tmp-test") is fn and base.is_baseline("tmp-test")
        assert "tmp-test" in base.list_baselines() and base.list_baselines() == sorted(base.list_baselines())
        with pytest.raises(ValueError, match="already registered"):
            base.register_baseline("tmp-test")(fn)
    finally:
        methods._REGISTRY.pop("tmp-test", None)
    assert not base.is_baseline("tmp-test")
    with pytest.raises(ValueError, match="choose one of"):
        base.get_baseline("tmp-test")


def test_register_baseline_records_what_it_is_told(monkeypatch):
    from slimrarts import methods
    from slimrarts.baselines import base

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the registrations vanish after the test

    def fn(*args, **kwargs):
        return None

    base.register_baseline("tmp-default")(fn)
    info = methods.get_method("tmp-default")
    assert (info.kind, info.source, info.description, info.data, info.passes) == ("baseline", "", "", "whole", 1)
    assert (info.has_alpha, info.supports_l1, info.two_nets) == (False, False, False)
    assert info.run is fn and info.step is None
    base.register_baseline("tmp-two", source="S", description="D", data="whole", passes=2)(fn)
    info = methods.get_method("tmp-two")
    assert (info.source, info.description, info.data, info.passes, info.trains) == ("S", "D", "whole", 2, True)
    base.register_baseline("tmp-none", data="none", passes=3)(fn)
    info = methods.get_method("tmp-none")
    assert (info.data, info.passes, info.trains) == ("none", 0, False)  # no training phase: no passes


def test_search_methods_are_not_baselines():
    from slimrarts.baselines import base
    from slimrarts.search import get_search

    assert not base.is_baseline("rarts") and base.is_baseline("slimming")
    assert "rarts" not in base.list_baselines()
    with pytest.raises(ValueError, match="baseline method 'rarts' is unknown"):
        base.get_baseline("rarts")
    info = get_search("rarts")
    assert info.supports_l1 and info.has_alpha and info.two_nets and info.data == "split"


def test_register_search_records_what_it_is_told(monkeypatch):
    from slimrarts import methods
    from slimrarts.search.base import register_search

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    def step(*args):
        return None

    register_search("tmp-search", two_nets=True, data="split", passes=3, source="P", description="D")(step)
    info = methods.get_method("tmp-search", "search")
    assert (info.source, info.description, info.two_nets, info.data, info.passes) == ("P", "D", True, "split", 3)
    assert info.supports_l1 is True and info.has_alpha is True and info.step is step and info.run is None
    with pytest.raises(ValueError, match="data must be 'split' or 'whole'"):
        register_search("tmp-bad", two_nets=False, data="none", passes=1, source="", description="")


def test_baselines_train_with_the_search_section():
    from slimrarts.baselines.base import search_like
    from slimrarts.recipe import load_recipe

    recipe = load_recipe({"search": {"epochs": 7, "optim": {"lr": 0.3}, "amp": "bf16", "channels_last": True,
                                     "cuda_graph": True, "log_every": 3}})
    cfg = search_like(recipe)
    assert (cfg.epochs, cfg.optim, cfg.amp, cfg.channels_last, cfg.cuda_graph, cfg.log_every) == (
        7, recipe.search.optim, "bf16", True, True, 3)
