"""Latency in the runtime that ships (issue 23, item 2): `report.latency.runtime` and `prune.budget.runtime`
(torch | onnxruntime | auto), resolved before training, recorded with every figure; the latency budget's floor
check and tightening time whole exported networks in onnxruntime."""

from __future__ import annotations

import builtins
import json
import warnings

import pytest
import torch
from conftest import tiny_loaders

import slimrarts
from slimrarts import deploy
from slimrarts.config import build
from slimrarts.errors import ConfigError, InputError, MissingExtraError
from slimrarts.models import create_model
from slimrarts.recipe import Recipe

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.05}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal", "branch-input"]},
        "report": {"rounds": 1, "repeats": 2}}


def _cfg(**sections):
    cfg = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    return cfg


def _without_onnxruntime(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)


# ---- choosing the runtime ----------------------------------------------------------------------------------------

def test_auto_is_onnxruntime_on_the_cpu_where_installed_and_torch_elsewhere(monkeypatch):
    assert deploy.resolve_runtime("auto", "cpu") == "onnxruntime"
    assert deploy.resolve_runtime("auto", "cuda:0") == "torch"  # onnxruntime's CPU provider only
    assert deploy.resolve_runtime("torch", "cpu") == "torch"
    _without_onnxruntime(monkeypatch)
    assert deploy.resolve_runtime("auto", "cpu") == "torch"  # an optional package missing: the default stays
    with pytest.raises(MissingExtraError, match=r"report\.latency\.runtime=onnxruntime needs the deploy extra.*"
                                                r"onnxruntime.*pip install \"slimrarts\[deploy\]\""):
        deploy.resolve_runtime("onnxruntime", "cpu", "report.latency.runtime")


def test_onnxruntime_on_a_gpu_or_an_unknown_runtime_is_refused_naming_the_field():
    with pytest.raises(InputError, match=r"prune\.budget\.runtime=onnxruntime times on onnxruntime's CPU provider.*"
                                         r"cuda:0"):
        deploy.resolve_runtime("onnxruntime", "cuda:0", "prune.budget.runtime")
    with pytest.raises(InputError, match=r"report\.latency\.runtime: 'ort' is not a runtime; choose one of torch, "
                                         r"onnxruntime, auto"):
        deploy.resolve_runtime("ort", "cpu", "report.latency.runtime")


def test_report_latency_is_a_section_and_true_false_still_mean_on_off():
    assert build(Recipe, {}).report.latency.runtime == "torch"  # the default: no optional package changes a run
    off = build(Recipe, {"report": {"latency": False}}).report.latency
    assert not off and off.enabled is False
    on = build(Recipe, {"report": {"latency": {"runtime": "auto"}}}).report.latency
    assert on and on.runtime == "auto"
    with pytest.raises(ConfigError, match=r"report\.latency\.runtime: 'ort' is not allowed; choose one of 'torch', "
                                          r"'onnxruntime', 'auto'"):
        build(Recipe, {"report": {"latency": {"runtime": "ort"}}})
    with pytest.raises(ConfigError, match=r"prune\.budget\.runtime"):
        build(Recipe, {"prune": {"mode": "budget", "budget": {"kind": "latency", "target": "50%", "runtime": "x"}}})


def test_a_missing_extra_fails_before_training(tiny_sets, tmp_path, monkeypatch):
    _without_onnxruntime(monkeypatch)
    with pytest.raises(MissingExtraError, match=r"report\.latency\.runtime=onnxruntime needs the deploy extra"):
        slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), 0.4, progress=False,
                        config=_cfg(report={"latency": {"runtime": "onnxruntime"}}), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- the report --------------------------------------------------------------------------------------------------

def test_the_report_times_dense_and_slim_in_onnxruntime_and_says_so(tiny_sets):
    torch.manual_seed(0)
    r = slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), 0.4, progress=False,
                        config=_cfg(report={"latency": {"runtime": "onnxruntime"}, "rounds": 1, "repeats": 2})).report
    lat = r["latency"]
    rt = lat["runtime"]
    assert rt["runtime"] == "onnxruntime" and rt["version"] == __import__("onnxruntime").__version__
    assert rt["threads"] == torch.get_num_threads() and rt["opset"] == deploy.OPSET and "dynamo=True" in rt["exporter"]
    assert [(x["device"], x["runtime"], x["batch"]) for x in lat["runs"]] == [("cpu", "onnxruntime", 1),
                                                                           ("cpu", "onnxruntime", 25)]
    for run in lat["runs"]:
        assert run["dense_s"] > 0 and run["slim_s"] > 0
        assert run["realised"] == pytest.approx(run["dense_s"] / run["slim_s"] / lat["macs_factor"])
    eager = slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), 0.4, progress=False,
                            config=_cfg(report={"rounds": 1, "repeats": 1})).report["latency"]
    assert eager["runtime"]["runtime"] == "torch" and eager["runtime"]["version"] == torch.__version__


def test_timing_in_onnxruntime_runs_the_exported_model():
    """`time_onnx` times the ONNX session (not the torch module): its calls go through onnxruntime, with a wall
    clock by default and an injected timer when given."""
    model = create_model("tiny_preresnet").eval()
    sessions: dict = {}
    seen = []

    def timer(fn, n):
        seen.append(fn.__defaults__[0])
        return [1e-3] * n

    [t] = deploy.time_onnx([model], (3, 32, 32), batch_size=3, timer=timer, rounds=2, repeats=2, warmup=1,
                           sessions=sessions)
    assert t.median_s == 1e-3 and len(t.rounds_s) == 2
    [(kept, session)] = sessions.values()
    assert kept is model and all(s is session for s in seen) and isinstance(session, deploy.OnnxSession)
    out = session(torch.randn(3, 3, 32, 32).numpy())[0]
    assert out.shape == (3, 10)
    [again] = deploy.time_onnx([model], (3, 32, 32), rounds=1, repeats=1, warmup=0, sessions=sessions)
    assert again.median_s > 0 and len(sessions) == 1  # exported once


# ---- a latency budget in onnxruntime -----------------------------------------------------------------------------

def _macs_timer(overhead_s: float = 0.0):
    """An injected wall clock for onnxruntime sessions: a call takes (MACs of the exported network) ns, as the
    deterministic per-layer tables count, plus a fixed `overhead_s` (a runtime's per-call cost, which the tables
    scaled from eager PyTorch do not see), so the timings do not depend on what else runs on the machine."""
    from slimrarts.metrics import macs_and_params

    def timer(fn, n):
        session = fn.__defaults__[0]
        assert isinstance(session, deploy.OnnxSession)  # every timing of the budget goes through onnxruntime
        return [macs_and_params(session.model, (1, 3, 32, 32))[0] * 1e-9 + overhead_s] * n
    return timer


def _dense_macs() -> int:
    from slimrarts.metrics import macs_and_params

    return macs_and_params(create_model("tiny_preresnet"), (1, 3, 32, 32))[0]


def _budget_in_ort(monkeypatch, overhead_s: float = 0.0):
    from test_prune_budget import _deterministic_latency_model

    import slimrarts.timing as timing

    _deterministic_latency_model(monkeypatch)
    monkeypatch.setattr(timing, "device_timer", lambda device: _macs_timer(overhead_s))


def test_an_onnxruntime_latency_budget_below_its_measured_floor_is_refused_before_training(tiny_sets, tmp_path,
                                                                                           monkeypatch):
    """The tables (scaled to the dense network's onnxruntime time) put the floor at about a quarter of it; a fixed
    per-call cost as large as the dense network's MACs puts the measured floor at about 60%: 40% is refused there,
    naming the runtime, before any training."""
    _budget_in_ort(monkeypatch, overhead_s=_dense_macs() * 1e-9)
    cfg = _cfg(report={"latency": False})
    with pytest.raises(InputError, match=r"below the measured time of the smallest network.*batch 1 in onnxruntime"):
        slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), progress=False, config=cfg,
                        budget={"latency": "40%", "runtime": "onnxruntime"}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_onnxruntime_latency_budget_is_met_on_the_exported_cut_and_recorded(tiny_sets, monkeypatch):
    _budget_in_ort(monkeypatch)
    cfg = _cfg(report={"latency": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), progress=False, config=cfg,
                            budget={"latency": "90%", "runtime": "onnxruntime"}).report
    b = r["budget"]
    assert b["runtime"]["runtime"] == "onnxruntime" and "whole exported networks" in b["tables"]
    assert b["met"] and b["achieved"] <= b["target_abs"] and b["achieved_fraction"] <= 0.9
    assert b["dense_measured"] == pytest.approx(b["dense"])  # the tables were scaled to the dense ONNX time
    assert b["dense"] == pytest.approx(_dense_macs() * 1e-9)
    assert b["measured_floor"] < b["target_abs"]
    assert all(h["measured_s"] > 0 for h in b["tighten"] if "measured_s" in h)
