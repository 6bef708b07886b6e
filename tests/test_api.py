"""slimrarts.prune end to end on tiny data; the CLI's run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimrarts
from slimrarts.cli import main
from slimrarts.data import DeviceLoader, Loaders, split_halves
from slimrarts.models import create_model
from slimrarts.width import ChannelSelect

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "arch": {"lr": 0.01}},
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
    assert r["accuracy"]["slim_before_finetune"] == pytest.approx(r["accuracy"]["masked"], abs=0.03)
    assert r["time_s"]["search"] > 0 and r["time_s"]["finetune"] > 0
    assert any(w["after"] != w["before"] for w in r["layers"].values())
    # the test set was read only by the evaluations: dense, searched, masked, before and after fine-tuning
    assert loaders.test.passes == 5
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
    text = f"""
name: tiny
data: {{root: {archive}, batch_size: 25, eval_batch_size: 40}}
model: {{name: tiny_preresnet}}
train: {{epochs: 2, optim: {{lr: 0.05}}}}
search: {{epochs: 2, optim: {{lr: 0.05}}, arch: {{lr: 0.01}}}}
prune: {{scope: [internal, branch-input], ratio: 0.4}}
finetune: {{epochs: 2, optim: {{lr: 0.05}}}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


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


@pytest.mark.parametrize("method, phase", [("rarts", "search"), ("rarts", "finetune"), ("slimming", "search")])
def test_cli_resume_after_interruption_matches(tmp_path, tiny_archive, monkeypatch, method, phase):
    """Interrupted after the first epoch of a phase, `--resume` ends with the same slim weights as one run."""
    recipe = _recipe(tmp_path, tiny_archive)
    extra = ["--set", f"search.method={method}"]
    assert main(["run", recipe, "--out", str(tmp_path / "a"), "--no-progress", *extra]) == 0
    import slimrarts.engine.rundir as rundir

    real_save = rundir.save_atomic
    calls = {"n": 0}

    def crash_after_first_epoch(obj, path):
        real_save(obj, path)
        if Path(path).stem == phase:
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "save_atomic", crash_after_first_epoch)
    assert main(["run", recipe, "--out", str(tmp_path / "b"), "--no-progress", *extra]) == 130
    assert calls["n"] == 1 and not (tmp_path / "b" / "slim.pt").exists()
    monkeypatch.undo()
    assert main(["run", recipe, "--out", str(tmp_path / "b"), "--resume", "--no-progress", *extra]) == 0
    a = torch.load(tmp_path / "a" / "slim.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "slim.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    assert (out / "recipe.yaml").read_text() == before and not (out / "recipe_changes.json").exists()
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 0
    # a learning rate is one of the keys a resume may change (after a divergence stop): recorded, not refused
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "train.optim.lr=0.02",
                 "--no-progress"]) == 0
    changes = json.loads((out / "recipe_changes.json").read_text())
    assert changes[-1]["changes"] == [{"key": "train.optim.lr", "old": 0.05, "new": 0.02}]
    assert "lr: 0.02" in (out / "recipe.yaml").read_text()


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
