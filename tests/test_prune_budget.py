"""Budgets through `slimrarts.prune`: the MACs budget is met on the real cut, the report says what was kept and how
fast the slim model is, impossible budgets fail before training, and the search options that serve a budget
(cost term, ℓ1 stopping rule, shrinking the losers, exclusions) do what they say."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_loaders

import slimrarts
from slimrarts.models import create_model

TINY = {"search": {"epochs": 2, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.05}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal", "branch-input"]},
        "report": {"rounds": 1, "repeats": 2}}


def _loaders(tiny_sets):
    return tiny_loaders(tiny_sets)


def _cfg(**sections):
    cfg = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def test_a_macs_budget_is_met_on_the_real_cut_and_reported(tiny_sets):
    torch.manual_seed(0)
    r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), budget={"macs": "50%"}, config=TINY,
                        progress=False).report
    b, m = r["budget"], r["macs"]
    assert r["mode"] == "budget" and b["kind"] == "macs" and b["target"] == "50%"
    assert b["achieved"] == m["after"] and b["met"] and b["predicted"] == m["after"]
    assert 0.49 <= m["after"] / m["before"] <= 0.50
    assert "keeps at most" in b["meaning"] and b["floor"] < b["target_abs"]
    runs = r["latency"]["runs"]
    assert [x["batch"] for x in runs] == [1, 25] and all(x["dense_s"] > 0 and x["slim_s"] > 0 for x in runs)
    assert all(x["speedup"] == pytest.approx(x["dense_s"] / x["slim_s"]) for x in runs)
    assert r["latency"]["macs_factor"] == pytest.approx(m["before"] / m["after"])


def test_a_params_budget_with_round_to(tiny_sets):
    cfg = _cfg(prune={"round_to": 2, "min_channels": 2})
    r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), budget={"params": "60%"}, config=cfg,
                        progress=False).report
    assert r["params"]["after"] <= 0.60 * r["params"]["before"]
    for g in r["groups"]:
        assert g["kept"] == g["size"] or (g["kept"] % 2 == 0 and g["kept"] >= 2)


def test_ratio_and_budget_together_are_refused(tiny_sets):
    with pytest.raises(ValueError, match="not both"):
        slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, budget={"macs": "50%"},
                        config=TINY, progress=False)


def test_an_impossible_budget_names_the_floor_before_training(tiny_sets, tmp_path):
    with pytest.raises(ValueError, match=r"below the smallest reachable.*\(\d+\.\d%\).*min_channels.*coupled"):
        slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), budget={"macs": "1%"}, config=TINY,
                        run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch of anything ran


def test_losers_shrink_to_zero_so_the_cut_costs_nothing(tiny_sets):
    """`search.shrink.which: losers` drives exactly the α that the selection prunes to 0: the masked model equals the
    searched one, so the accuracy right after the cut is the searched accuracy."""
    cfg = _cfg(search={"epochs": 3, "shrink": {"which": "losers", "strength": 50.0}})
    r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=cfg, progress=False).report
    assert r["accuracy"]["masked"] == r["accuracy"]["searched"]
    plain = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=TINY,
                            progress=False).report
    assert plain["settings"]["search"]["shrink"]["which"] == "none"


def test_losers_are_rechosen_every_few_steps_within_an_epoch(tiny_sets, monkeypatch):
    """`search.shrink.every`: the losers are re-chosen between steps (not only at epoch starts), so a one-epoch
    search shrinks the channels the search finds, not the initial ties; the first epoch starts with no losers."""
    import slimrarts.width.select as selection

    chosen = []
    real = selection.Selection.select

    def counting(self, scores):
        chosen.append([s.clone() for s in scores])
        return real(self, scores)

    monkeypatch.setattr(selection.Selection, "select", counting)
    cfg = _cfg(search={"epochs": 1, "shrink": {"which": "losers", "strength": 5.0, "every": 2}})
    loaders = _loaders(tiny_sets)
    steps = len(loaders.search_t)
    r = slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.4, config=cfg, progress=False).report
    refreshes = len(chosen) - 1  # the last call is the cut itself
    assert refreshes == steps // 2
    assert not all(torch.equal(a, b) for a, b in zip(chosen[0], chosen[-2], strict=True))  # α moved between them
    assert any(float(a.min()) != float(a.max()) for a in chosen[0])  # the first refresh sees learned α
    assert r["settings"]["search"]["shrink"]["every"] == 2


def test_l1_with_a_budget_stops_the_search_once_the_budget_fits(tiny_sets, tmp_path):
    cfg = _cfg(search={"epochs": 6, "optim_arch": {"lr": 0.2}}, prune={"mode": "l1", "l1": 5.0,
                                                                  "budget": {"kind": "macs", "target": "90%"}})
    r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), config=cfg, run_dir=tmp_path / "r",
                        progress=False).report
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    search = [x for x in lines if x["phase"] == "search"]
    assert 1 <= len(search) < 6  # stopped early, at the end of an epoch
    assert r["macs"]["after"] <= r["budget"]["target_abs"]


def test_excluded_layers_keep_their_width(tiny_sets):
    cfg = _cfg(prune={"exclude": ["layer1.*"]})
    r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.5, config=cfg, progress=False).report
    layer1 = [g for g in r["groups"] if g["name"].startswith(("layer1.", "input:layer1."))]
    assert layer1 and all(g["kept"] == g["size"] for g in layer1)
    assert any(g["kept"] < g["size"] for g in r["groups"] if g not in layer1)


def test_the_cost_term_pulls_alpha_down(tiny_sets):
    """With μ > 0 the α-step adds the gradient of μ·MACs(α)/MACs_dense: the searched |α| end smaller."""
    means = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        cfg = _cfg(search={"cost": {"mu": mu}})
        from slimrarts.api import search_width
        from slimrarts.recipe import load_recipe

        recipe = load_recipe(cfg, ["prune.ratio=0.4"])
        found = search_width(create_model("tiny_preresnet"), _loaders(tiny_sets), recipe,
                             device=torch.device("cpu"), progress=False)
        means[mu] = torch.cat([a.detach().abs() for a in found.gates.alphas]).mean().item()
    assert means[5.0] < means[0.0] - 0.01


def _deterministic_latency_model(monkeypatch):
    """The per-layer latency model built with a timer that counts MACs, so its floor does not depend on the load."""
    from test_budget import ConvTimer

    import slimrarts.width.select as selection

    real = selection.build_latency_model

    def build(*args, **kwargs):
        return real(*args, **{**kwargs, "timer": ConvTimer(), "cache": False, "warmup": 0, "repeats": 1})

    monkeypatch.setattr(selection, "build_latency_model", build)


def _timed(slim_s: float):
    """A stand-in for `deploy.time_in` (dense, then the smallest network): the dense takes 1 s, the other
    `slim_s` seconds."""
    from slimrarts.width.latency import Timing

    def time_in(runtime, models, input_size, **kwargs):
        return [Timing(1.0, 0.01, [1.0])] + [Timing(slim_s, 0.01, [slim_s]) for _ in models[1:]]

    return time_in


def test_a_latency_target_below_the_measured_floor_fails_before_training(tiny_sets, tmp_path, monkeypatch):
    """The per-layer model can under-predict an overhead-bound network; the smallest network is timed before
    training and a target below its time fails there, naming the measured floor."""
    import slimrarts.width.select as selection

    _deterministic_latency_model(monkeypatch)
    monkeypatch.setattr(selection, "time_in", _timed(0.9))
    with pytest.raises(ValueError, match=r"below the measured time of the smallest network.*batch 1"):
        slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), budget={"latency": "95%"},
                        config=TINY, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no epoch of anything ran


def test_a_latency_target_above_the_measured_floor_goes_on_and_reports_it(tiny_sets, monkeypatch):
    import slimrarts.width.select as selection

    _deterministic_latency_model(monkeypatch)
    monkeypatch.setattr(selection, "time_in", _timed(1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the real re-timing after the cut may miss on a tiny net
        r = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), budget={"latency": "95%"},
                            config=TINY, progress=False).report
    assert r["budget"]["kind"] == "latency" and r["budget"]["measured_floor"] == 1e-6
