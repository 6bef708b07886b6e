"""slimrarts.prune end to end on tiny data; the CLI's run folders."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_recipe

import slimrarts
from slimrarts.cli import main
from slimrarts.data import DeviceLoader, ImageSet, Loaders, split_halves
from slimrarts.models import create_model
from slimrarts.width import ChannelSelect

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal", "branch-input"]}}


class _Counting:
    """Wraps a loader and counts full passes over it."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def _loaders(tiny_sets):
    train, test = tiny_sets
    idx_t, idx_v = split_halves(train.labels)
    return Loaders(train=DeviceLoader(train, 25, train=True), test=_Counting(DeviceLoader(test, 40, train=False)),
                   search_t=DeviceLoader(train, 25, train=True, indices=idx_t, seed=1),
                   search_v=DeviceLoader(train, 25, train=True, indices=idx_v, seed=2))


STAGES = ("prepare", "search", "select", "remove", "recalibrate", "finetune", "finish")


def test_prune_runs_its_stages_in_order_over_one_run_state(tiny_sets, monkeypatch):
    """prune() is its stages (ARCHITECTURE.md names them), called in the pipeline's order, each over the same run."""
    import slimrarts.api as api

    calls = []

    def recording(name, fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            run = out if name == "prepare" else args[0]
            calls.append((name, id(run), run.keep is not None, run.spec is not None, run.finetune_phase is not None))
            return out
        return recorded

    for name in STAGES:
        monkeypatch.setattr(api, name, recording(name, getattr(api, name)))
    torch.manual_seed(0)
    result = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=TINY, progress=False)
    assert [c[0] for c in calls] == list(STAGES)
    assert len({c[1] for c in calls}) == 1  # one run state passed along
    # what each stage leaves: keep masks from select on, the removal spec from remove on, fine-tuning at the end
    assert [c[2] for c in calls] == [False, False, True, True, True, True, True]
    assert [c[3] for c in calls] == [False, False, False, True, True, True, True]
    assert [c[4] for c in calls] == [False, False, False, False, False, True, True]
    assert isinstance(result, slimrarts.PruneResult) and result.width_spec["groups"]


def test_prune_end_to_end(tiny_sets, tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_preresnet")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    loaders = _loaders(tiny_sets)
    result = slimrarts.prune(model, loaders, 0.4, config=TINY, run_dir=tmp_path / "run", progress=False,
                             model_info={"name": "tiny_preresnet", "num_classes": 10})
    r = result.report
    assert abs(r["prc"] - 0.4) <= 1 / r["gated_channels"]
    assert r["params"]["after"] < r["params"]["before"] and r["macs"]["after"] < r["macs"]["before"]
    assert r["params"]["after"] == sum(p.numel() for p in result.model.parameters())
    assert r["removal_max_abs_diff"] < 1e-4
    assert set(r["accuracy"]) >= {"dense", "searched", "slim_before_finetune", "slim_after_finetune"}
    a = r["accuracy"]
    assert a["slim_stale_bn"] == a["masked"]  # the same function with the same statistics, so the same answers
    assert a["recalibrated_batches"] == min(40, len(loaders.train))  # the default, or every batch there is
    assert a["slim_before_finetune"] != a["slim_stale_bn"]  # the recalibrated statistics are another model
    assert r["time_s"]["search"] > 0 and r["time_s"]["finetune"] > 0
    assert any(w["after"] != w["before"] for w in r["layers"].values())
    # the test set was read only by the evaluations: dense, searched, masked, cut, recalibrated, fine-tuned
    assert loaders.test.passes == 6
    # the user's model is untouched; the result is a plain module that runs without hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    assert all(not m._forward_hooks for m in result.model.modules())
    assert any(isinstance(m, ChannelSelect) for m in result.model.modules())
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "slim.pt", "width_spec.json", "alphas.json",
                 "checkpoints/search.pt", "checkpoints/finetune.pt"):
        assert (run / name).exists(), name
    phases = [json.loads(x)["phase"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["search", "finetune"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(slimrarts.load(run)(x), result.model(x))


class _TestSetGuard:
    """A test loader that may be read only to evaluate (inference mode) before the selection is final, and then serves
    `decoy` batches (other images, shuffled labels): anything it influenced before the selection shows up as a
    difference from a run with the real test set. Reading it to train (grad mode) raises at any time."""

    def __init__(self, loader, decoy):
        self.loader, self.decoy, self.final, self.reads = loader, decoy, False, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if not torch.is_inference_mode_enabled():
            raise AssertionError("the test set was read outside an evaluation")
        self.reads.append(self.final)
        return iter(self.loader if self.final else self.decoy)


def _guarded_prune(tiny_sets, monkeypatch, decoy: bool, **kwargs):
    """prune() with the test set guarded; the selection is final when select_ratio/select_l1 return."""
    import slimrarts.width.select as selection

    train, test = tiny_sets
    loaders = _loaders(tiny_sets)
    g = torch.Generator().manual_seed(5)
    fake = ImageSet(train.images[torch.randperm(len(train.labels), generator=g)[:len(test.labels)]],
                    test.labels[torch.randperm(len(test.labels), generator=g)], classes=test.classes)
    real_test = DeviceLoader(test, 40, train=False)
    guard = _TestSetGuard(real_test, DeviceLoader(fake, 40, train=False) if decoy else real_test)
    loaders.test = guard
    def finalising(fn):
        def wrapped(*args, **kw):
            out = fn(*args, **kw)
            guard.final = True
            return out
        return wrapped

    with monkeypatch.context() as patch:
        patch.setattr(selection, "select_ratio", finalising(selection.select_ratio))
        patch.setattr(selection, "select_l1", finalising(selection.select_l1))
        torch.manual_seed(0)
        result = slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.4, config=TINY, progress=False, **kwargs)
    return result, guard


@pytest.mark.parametrize("method", ["rarts", "slimming"])
def test_the_test_set_chooses_nothing(tiny_sets, monkeypatch, method):
    """The selection and the slim weights are the same whether the test set read before the selection is the real
    one or a decoy; it is read for the final evaluation (the real one) and never to train."""
    real, guard_real = _guarded_prune(tiny_sets, monkeypatch, False, method=method)
    decoyed, guard = _guarded_prune(tiny_sets, monkeypatch, True, method=method)
    assert guard.reads[-1] and not guard.reads[0]  # read before (for the report) and after the selection
    assert [g["kept"] for g in decoyed.width_spec["groups"]] == [g["kept"] for g in real.width_spec["groups"]]
    a, b = real.model.state_dict(), decoyed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert decoyed.report["accuracy"]["slim_after_finetune"] == real.report["accuracy"]["slim_after_finetune"]


def _search_weights(run_dir, keep):
    ckpt = torch.load(run_dir / "checkpoints" / "search.pt", weights_only=True)
    w, y = ckpt["w"], ckpt["y"]
    return {"w": w, "y": y, "mean": {k: (w[k] + y[k]) / 2 for k in w}}[keep], w, y


@pytest.mark.parametrize("keep", ["y", "w", "mean"])
def test_search_final_weights_chooses_the_weights_of_the_slim_model(tiny_sets, tmp_path, keep):
    """search.final_weights: the slim model's convolutions are y's, w's or their mean (fine-tuning at a learning rate
    too small to move a float32 weight, so what reaches the slim model is what was kept)."""
    config = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}, "final_weights": keep,
                         "beta": 1e-3},
              "finetune": {"epochs": 1, "optim": {"lr": 1e-30, "weight_decay": 0.0}}, "prune": {"scope": ["internal"]}}
    torch.manual_seed(0)
    result = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.3, config=config,
                             run_dir=tmp_path / "run", progress=False)
    expected, w, y = _search_weights(tmp_path / "run", keep)
    slim = dict(result.model.named_parameters())
    unchanged = [name for name, m in result.model.named_modules() if isinstance(m, torch.nn.Conv2d)
                 and result.width_spec["layers"][name]["before"] == result.width_spec["layers"][name]["after"]]
    assert len(unchanged) >= 2
    for name in unchanged:
        k = f"{name}.weight"
        assert not torch.equal(w[k], y[k]), k  # w and y differ, so the choice shows
        assert torch.equal(slim[k], expected[k]), k


def test_keep_weights_copies_or_averages_parameters_and_buffers():
    """`_take_final_weights`: y copies y's parameters and BN statistics; mean averages the floating ones and takes y's
    counters; w leaves the model (whose parameters are w) alone."""
    from slimrarts.api import _take_final_weights
    from slimrarts.recipe import ArchOptimConfig, OptimConfig
    from slimrarts.search.problem import make_state

    for keep in ("y", "w", "mean"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        alpha = [torch.ones(4, requires_grad=True)]
        state = make_state(model, alpha, "rarts", optim_w=OptimConfig(), optim_arch=ArchOptimConfig())
        with torch.no_grad():
            for v in state.y.values():
                v.add_(torch.randn_like(v))
            state.y_buffers["1.running_mean"].add_(1.0)
            state.y_buffers["1.num_batches_tracked"].fill_(7)
            model[1].num_batches_tracked.fill_(3)
        w = {k: v.detach().clone() for k, v in model.state_dict().items()}
        y = {k: v.detach().clone() for k, v in {**state.y, **state.y_buffers}.items()}
        _take_final_weights(model, state, keep)
        for k, v in model.state_dict().items():
            if keep == "w":
                want = w[k]
            elif keep == "y" or not v.is_floating_point():
                want = y[k]
            else:
                want = (w[k] + y[k]) / 2
            assert torch.equal(v, want), (keep, k)


def test_l1_mode_prunes_exactly_the_zero_alphas(tiny_sets, tmp_path):
    """prune.mode=l1 through prune(): the pruned channels are those whose α the proximal step set to exactly 0
    (a group left with no nonzero α keeps its first channel, min_channels=1); the PRC is learned. Four SGD steps
    of η_α·γ = 0.25 shrink every α by exactly 1 in all: the data gradient decides which reach 0."""
    config = {"search": {"epochs": 1, "optim": {"lr": 0.05},
                         "optim_arch": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0}},
              "finetune": {"epochs": 1, "optim": {"lr": 0.05}},
              "prune": {"scope": ["internal", "branch-input"], "mode": "l1", "l1": 2.5}}
    torch.manual_seed(0)
    result = slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), None, config=config,
                             run_dir=tmp_path / "run", progress=False)
    r = result.report
    alphas = json.loads((tmp_path / "run" / "alphas.json").read_text())["alphas"]
    flat = [v for a in alphas for v in a]
    assert 0.2 < sum(v == 0 for v in flat) / len(flat) < 0.8  # some channels reached zero, some did not
    for a, g in zip(alphas, result.width_spec["groups"], strict=True):
        nonzero = [i for i, v in enumerate(a) if v != 0]
        assert g["kept"] == (nonzero or [0]), g["name"]
    assert r["mode"] == "l1" and r["ratio_requested"] is None
    assert r["pruned_channels"] == sum(len(a) - len(g["kept"])
                                       for a, g in zip(alphas, result.width_spec["groups"], strict=True))
    assert r["prc"] == pytest.approx(r["pruned_channels"] / r["gated_channels"])


def test_prune_with_plain_dataloaders(tiny_sets):
    train, test = tiny_sets
    mk = lambda s: torch.utils.data.TensorDataset(s.images.float() / 255, s.labels)  # noqa: E731
    tr, te = mk(train), mk(test)
    tr.targets = train.labels
    pair = (torch.utils.data.DataLoader(tr, batch_size=25, shuffle=True, drop_last=True),
            torch.utils.data.DataLoader(te, batch_size=50))
    result = slimrarts.prune(create_model("tiny_resnet"), pair, 0.3, method="darts1", config=TINY, progress=False)
    assert result.report["method"] == "darts1"
    assert abs(result.report["prc"] - 0.3) <= 1 / result.report["gated_channels"]


def test_prune_rejects_bad_input(tiny_sets):
    loaders = _loaders(tiny_sets)
    with pytest.raises(ValueError, match="prune.ratio"):
        slimrarts.prune(create_model("tiny_resnet"), loaders, 1.5, config=TINY, progress=False)
    with pytest.raises(ValueError, match="search.method"):
        slimrarts.prune(create_model("tiny_resnet"), loaders, 0.4, method="dartz", config=TINY, progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        slimrarts.prune("resnet", loaders, 0.4, config=TINY, progress=False)
    with pytest.raises(TypeError, match="loaders"):
        slimrarts.prune(create_model("tiny_resnet"), object(), 0.4, config=TINY, progress=False)


def _recipe(tmp_path, archive) -> str:
    return write_tiny_recipe(tmp_path, archive)


def test_cli_run_writes_every_artefact_and_refuses_to_overwrite(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["run", recipe, "--out", str(out), "--no-progress"]) == 0
    assert "PRC" in capsys.readouterr().out  # the summary table prints without progress bars too
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "slim.pt", "width_spec.json", "alphas.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["train"] == 200
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["run", recipe, "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    model = slimrarts.load(out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cli_train_and_report(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    assert main(["train", recipe, "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    assert (tmp_path / "base" / "model.pt").exists()
    assert main(["run", recipe, "--out", str(tmp_path / "pr"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "pr"), "--md", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "baseline (train)" in table and "rarts" in table


def test_cli_bad_recipe_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochz: 3}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resume_with_other_settings_is_refused(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    before = (out / "recipe.yaml").read_text()
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "train.optim.momentum=0.5",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.optim.momentum" in err and "0.9" in err and "0.5" in err
    assert (out / "recipe.yaml").read_text() == before
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 0
    # a learning rate is one of the keys a resume may change (after a divergence stop), but this run is finished:
    # nothing would train under the new value, so it is refused rather than written into the run's record
    model = (out / "model.pt").read_bytes()
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "train.optim.lr=0.02",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.optim.lr: 0.05 → 0.02" in err and "finished" in err
    assert (out / "recipe.yaml").read_text() == before and (out / "model.pt").read_bytes() == model
    assert json.loads((out / "report.json").read_text())["settings_history"][-1]["changes"] == []


def test_bad_combinations_fail_before_training(tiny_sets):
    loaders = _loaders(tiny_sets)
    cfg = dict(TINY, prune={"scope": ["internal"], "reference": "somewhere"})
    with pytest.raises(ValueError, match="prune.reference only applies"):
        slimrarts.prune(create_model("tiny_resnet"), loaders, 0.4, config=cfg, progress=False)
    assert loaders.test.passes == 0  # the recipe's own validation refused it before any evaluation


def test_report_plots_widths_and_alphas(tmp_path, tiny_archive):
    pytest.importorskip("matplotlib", reason="plots need the `plot` extra")
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "pr"
    assert main(["run", recipe, "--out", str(out), "--no-progress", "--set", "search.epochs=1",
                 "--set", "finetune.epochs=1"]) == 0
    assert main(["report", str(out), "--plot"]) == 0
    for name in ("widths.png", "alphas.png"):
        assert (out / name).stat().st_size > 1000
