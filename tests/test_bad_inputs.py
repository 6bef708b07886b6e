"""Nothing lost, nothing silent: --force safety, divergence stops, corrupt files, and inputs that would fail deep
inside torch all fail early with a message naming the problem, and nothing outside the run folder is touched."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY_PRUNE, tiny_recipe_file
from torch.utils.data import DataLoader, TensorDataset

import slimrarts
from slimrarts.cli import main
from slimrarts.data import DeviceLoader, ImageSet, Loaders, split_halves
from slimrarts.engine.checkpoint import CorruptFileError
from slimrarts.engine.rundir import MARKER, prepare_run_dir
from slimrarts.models import create_model

TINY = TINY_PRUNE
_recipe = tiny_recipe_file


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _loaders(tiny_sets, test=None):
    train, tst = tiny_sets
    idx_t, idx_v = split_halves(train.labels)
    return Loaders(train=DeviceLoader(train, 25, train=True), test=test or DeviceLoader(tst, 40, train=False),
                   search_t=DeviceLoader(train, 25, train=True, indices=idx_t, seed=1),
                   search_v=DeviceLoader(train, 25, train=True, indices=idx_v, seed=2))


# ---- --force ---------------------------------------------------------------------------------------------------

def test_force_refuses_a_folder_slimrarts_did_not_make(tmp_path, tiny_archive, capsys):
    """A project folder that merely holds a recipe.yaml and a checkpoints/ folder is not a run: --force refuses."""
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "recipe.yaml").write_text(Path(_recipe(tmp_path, tiny_archive)).read_text())
    (project / "notes.txt").write_text("my notes")
    before = _snapshot(project)
    assert main(["run", _recipe(tmp_path, tiny_archive), "--out", str(project), "--force", "--no-progress"]) == 2
    assert "not made by slimrarts" in capsys.readouterr().err
    assert _snapshot(project) == before


def test_force_refuses_the_current_folder_and_its_parents(tmp_path, tiny_archive, monkeypatch, capsys):
    (tmp_path / "r").mkdir()
    recipe = _recipe(tmp_path / "r", tiny_archive)
    run = tmp_path / "runs" / "here"
    prepare_run_dir(run)
    (tmp_path / "runs" / MARKER).write_text("{}")  # even a parent that looks like a run is never deleted
    monkeypatch.chdir(run)
    before = _snapshot(tmp_path / "runs")
    for out in (".", str(tmp_path / "runs")):
        assert main(["run", recipe, "--out", out, "--force", "--no-progress"]) == 2
        assert "current folder or one of its parents" in capsys.readouterr().err
        assert _snapshot(tmp_path / "runs") == before


def test_force_refuses_a_run_folder_holding_a_user_file(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    (out / "my_analysis.ipynb").write_text("{}")
    before = _snapshot(out)
    assert main(["train", recipe, "--out", str(out), "--force", "--no-progress"]) == 2
    assert "my_analysis.ipynb" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_force_validates_before_deleting(tmp_path, tiny_archive, capsys):
    """A typo in the model name fails before --force deletes the old run."""
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    before = _snapshot(out)
    assert main(["train", recipe, "--out", str(out), "--force", "--set", "model.name=tiny_presnet",
                 "--no-progress"]) == 2
    assert "tiny_presnet" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_force_restarts_a_run_it_made(tmp_path, tiny_archive):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    (out / "metrics.jsonl").write_text('{"phase": "train", "epoch": 99}\n')
    assert main(["train", recipe, "--out", str(out), "--force", "--no-progress"]) == 0
    epochs = [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0] and (out / MARKER).is_file()


# ---- divergence ------------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_the_setting_at_fault_and_resumes(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    bad = tmp_path / "bad"
    assert main(["run", recipe, "--out", str(bad), "--set", "search.optim.lr=1e6", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "search phase diverged in epoch 0" in err and "search.optim.lr" in err
    assert not (bad / "slim.pt").exists() and not (bad / "report.json").exists()
    assert not (bad / "checkpoints" / "search.pt").exists()  # the diverged epoch was not saved
    # --resume may lower the learning rate: the run then equals one made with that rate from the start
    assert main(["run", recipe, "--out", str(bad), "--resume", "--set", "search.optim.lr=0.05", "--no-progress"]) == 0
    start, resumed = json.loads((bad / "settings_history.json").read_text())["segments"]
    assert start["changes"] == [] and start["from"] == {"phase": "search", "epoch": 0}
    assert resumed["changes"] == [{"key": "search.optim.lr", "old": 1e6, "new": 0.05}]
    assert resumed["from"] == {"phase": "search", "epoch": 0}  # every epoch of the model ran at 0.05
    assert json.loads((bad / "report.json").read_text())["settings_history"] == [start, resumed]
    good = tmp_path / "good"
    assert main(["run", recipe, "--out", str(good), "--no-progress"]) == 0
    a = torch.load(bad / "slim.pt", weights_only=True)["state_dict"]
    b = torch.load(good / "slim.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tiny_sets, tmp_path, monkeypatch):
    """A loss that turns NaN in the second fine-tune epoch stops the run there: the first epoch's checkpoint stays,
    no slim.pt or report is written."""
    import slimrarts.api as api

    cfg = dict(TINY, finetune={"epochs": 3, "optim": {"lr": 0.05}})
    real_fit, calls = api.fit, {"n": 0}

    def fit_with_poisoned_loss(*args, **kwargs):
        if kwargs.get("phase") == "finetune":
            steps = len(args[1])

            def loss_fn(out, target):
                calls["n"] += 1
                loss = torch.nn.functional.cross_entropy(out.float(), target)
                return loss * float("nan") if calls["n"] > steps else loss

            kwargs["loss_fn"] = loss_fn
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(api, "fit", fit_with_poisoned_loss)
    diverged = "finetune phase diverged in epoch 1.*the train loss.*finetune.optim"  # its loss named in words
    with pytest.raises(slimrarts.engine.DivergenceError, match=diverged):
        slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=cfg, run_dir=tmp_path / "r",
                        progress=False)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "finetune.pt", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "r" / "slim.pt").exists() and not (tmp_path / "r" / "report.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines][-1] == ("finetune", 0)


# ---- corrupt files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_resume_over_a_damaged_checkpoint_names_the_file(tmp_path, tiny_archive, capsys, damage):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    ckpt = out / "checkpoints" / "train.pt"
    raw = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "cannot be read" in err and "--force" in err
    assert "this 'train' checkpoint cannot be read" in err  # which phase's checkpoint
    assert "weights_only=False" not in err  # torch's unsafe advice is not passed on


def test_load_of_a_damaged_slim_model_names_the_file(tmp_path):
    path = tmp_path / "slim.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(CorruptFileError, match="slim.pt"):
        slimrarts.load(path)


def test_resume_without_recipe_yaml_is_refused(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    (out / "recipe.yaml").unlink()
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "train.epochs=3", "--no-progress"]) == 2
    assert "recipe.yaml is missing" in capsys.readouterr().err


def test_a_damaged_recipe_yaml_is_named(tmp_path, tiny_archive, capsys):
    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    (out / "recipe.yaml").write_text("train: [unclosed\n")
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "recipe.yaml" in capsys.readouterr().err


def test_a_damaged_reference_width_spec_is_named(tiny_sets, tmp_path):
    spec = tmp_path / "width_spec.json"
    spec.write_text("{not json")
    cfg = dict(TINY, search={"method": "random", "epochs": 1}, prune={"scope": ["internal"], "reference": str(spec)})
    with pytest.raises(ValueError, match="width_spec.json"):
        slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=cfg, progress=False)


def test_a_damaged_data_cache_entry_is_rebuilt(tmp_path, tiny_archive, monkeypatch):
    from slimrarts.data import load_cifar

    monkeypatch.setenv("SLIMRARTS_CACHE", str(tmp_path / "cache"))
    train, _ = load_cifar("cifar10", tiny_archive)
    entries = list((tmp_path / "cache").rglob("*.pt"))
    assert entries
    for entry in entries:
        entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        again, _ = load_cifar("cifar10", tiny_archive)
    assert torch.equal(again.images, train.images)
    assert all(torch.load(e, weights_only=True) for e in entries)  # rewritten whole


# ---- load(model=m) ---------------------------------------------------------------------------------------------

def test_load_never_cuts_the_users_model(tiny_sets, tmp_path):
    cfg = dict(TINY, finetune={"epochs": 1, "optim": {"lr": 0.05}})
    slimrarts.prune(create_model("tiny_preresnet"), _loaders(tiny_sets), 0.4, config=cfg, run_dir=tmp_path / "r",
                    progress=False)
    mine = create_model("tiny_preresnet")
    shapes = {k: v.shape for k, v in mine.state_dict().items()}
    slim = slimrarts.load(tmp_path / "r", model=mine)
    assert {k: v.shape for k, v in mine.state_dict().items()} == shapes
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in mine.parameters())
    other = create_model("tiny_resnet")
    shapes = {k: v.shape for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not exist in this model"):
        slimrarts.load(tmp_path / "r", model=other)
    assert {k: v.shape for k, v in other.state_dict().items()} == shapes


# ---- pre-flight checks -----------------------------------------------------------------------------------------

def _tiny_set(labels: torch.Tensor, channels: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(images, labels, classes=tuple(f"c{i}" for i in range(max(10, int(labels.max()) + 1))))


class _NeverRead:
    def __iter__(self):
        raise AssertionError("the test loader was read before the pre-flight checks finished")

    def __len__(self):
        return 1


def test_labels_outside_the_models_outputs_fail_before_training(tiny_sets):
    train, test = tiny_sets
    labels = train.labels.clone()
    labels[7] = 12
    bad = ImageSet(train.images, labels, classes=tuple(f"c{i}" for i in range(13)))
    idx_t, idx_v = split_halves(labels)
    loaders = Loaders(train=DeviceLoader(bad, 25, train=True), test=_NeverRead(),
                      search_t=DeviceLoader(bad, 25, train=True, indices=idx_t),
                      search_v=DeviceLoader(bad, 25, train=True, indices=idx_v))
    with pytest.raises(ValueError, match=r"label 12 is outside \[0, 10\)"):
        slimrarts.prune(create_model("tiny_preresnet"), loaders, 0.4, config=TINY, progress=False)


def test_a_user_loader_with_a_bad_label_fails_at_that_batch(tiny_sets):
    train, test = tiny_sets
    x = train.images.float() / 255
    y = train.labels.clone()
    y[130] = -1
    ds = TensorDataset(x, y)
    dl = DataLoader(ds, batch_size=20, shuffle=False)
    tl = DataLoader(TensorDataset(test.images.float() / 255, test.labels), batch_size=40)
    with pytest.raises(ValueError, match=r"batch \d+: label -1 is outside \[0, 10\)"):
        slimrarts.prune(create_model("tiny_preresnet"), (dl, tl), 0.4, config=TINY, progress=False)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_training_samples(n, tiny_sets):
    train, test = tiny_sets
    ds = TensorDataset(train.images[:n].float() / 255, train.labels[:n])
    tl = DataLoader(TensorDataset(test.images.float() / 255, test.labels), batch_size=40)
    with pytest.raises(ValueError, match="at least"):
        slimrarts.prune(create_model("tiny_preresnet"), (DataLoader(ds, batch_size=2), tl), 0.4, config=TINY,
                        progress=False)


def test_images_with_the_wrong_channel_count(tiny_sets):
    train, test = tiny_sets
    ds = TensorDataset(train.images[:, :1].float() / 255, train.labels)
    tl = DataLoader(TensorDataset(test.images[:, :1].float() / 255, test.labels), batch_size=40)
    with pytest.raises(ValueError, match=r"cannot read the data's batches of shape \(8, 1, 32, 32\).*3 channels"):
        slimrarts.prune(create_model("tiny_preresnet"), (DataLoader(ds, batch_size=20), tl), 0.4, config=TINY,
                        progress=False)


def test_integer_images_are_refused(tiny_sets):
    train, test = tiny_sets
    ds = TensorDataset(train.images, train.labels)
    tl = DataLoader(TensorDataset(test.images, test.labels), batch_size=40)
    with pytest.raises(TypeError, match="uint8.*floating-point"):
        slimrarts.prune(create_model("tiny_preresnet"), (DataLoader(ds, batch_size=20), tl), 0.4, config=TINY,
                        progress=False)


def test_half_precision_and_meta_models_are_refused(tiny_sets):
    with pytest.raises(ValueError, match="float16.*model.float"):
        slimrarts.prune(create_model("tiny_preresnet").half(), _loaders(tiny_sets), 0.4, config=TINY, progress=False)
    with torch.device("meta"):
        meta = create_model("tiny_preresnet")
    with pytest.raises(ValueError, match="meta device"):
        slimrarts.prune(meta, _loaders(tiny_sets), 0.4, config=TINY, progress=False)


def test_a_wholly_frozen_model_is_refused(tiny_sets):
    with pytest.raises(ValueError, match="frozen"):
        slimrarts.prune(create_model("tiny_preresnet").requires_grad_(False), _loaders(tiny_sets), 0.4, config=TINY,
                        progress=False)


@pytest.mark.parametrize("method", ["rarts", "darts2", "slimming"])
def test_frozen_layers_are_left_out_with_a_reason(tiny_sets, method):
    model = create_model("tiny_preresnet")
    frozen = model.layer1[0].conv1
    frozen.requires_grad_(False)
    before = frozen.weight.detach().clone()
    cfg = dict(TINY, search=dict(TINY["search"], method=method), prune={"scope": ["internal", "branch-input"]})
    r = slimrarts.prune(model, _loaders(tiny_sets), 0.3, config=cfg, progress=False).report
    names = {s["name"]: s["reason"] for s in r["skipped"]}
    assert "layer1.0.conv1" in names and "frozen" in names["layer1.0.conv1"]
    assert all("layer1.0.conv1" not in g["sites"] and g["name"] != "layer1.0.conv1" for g in r["groups"])
    assert torch.equal(frozen.weight, before)  # the user's model is untouched


class _TupleNet(nn.Module):
    """Returns (logits, features) in training mode and a dict in eval mode."""

    def __init__(self):
        super().__init__()
        self.net = create_model("tiny_resnet")

    def forward(self, x):
        out = self.net(x)
        return (out, x.mean()) if self.training else {"logits": out, "extra": x.mean()}


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = create_model("tiny_resnet")

    def forward(self, pixel_values):
        return collections.namedtuple("Out", "logits")(self.net(pixel_values))


def test_models_returning_tuples_dicts_or_taking_dicts_work(tiny_sets):
    r = slimrarts.prune(_TupleNet(), _loaders(tiny_sets), 0.3, config=TINY, progress=False)
    assert r.report["macs"]["after"] < r.report["macs"]["before"]
    assert isinstance(r.model.eval()(torch.randn(1, 3, 32, 32)), dict)  # the slim model is the user's, unhooked
    r = slimrarts.prune(_DictInput(), _loaders(tiny_sets), 0.3, config=TINY, progress=False,
                        input_fn=lambda x: {"pixel_values": x})
    assert r.report["removal_max_abs_diff"] < 1e-4


def test_an_unreadable_output_names_output_fn(tiny_sets):
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = create_model("tiny_resnet")

        def forward(self, x):
            return {"scores": [self.net(x)]}

    with pytest.raises(TypeError, match="output_fn"):
        slimrarts.prune(Weird(), _loaders(tiny_sets), 0.3, config=TINY, progress=False)


@pytest.mark.parametrize("name", ["torchvision:googlenet", "torchvision:inception_v3"])
def test_googlenet_and_inception_namedtuple_outputs(name):
    """In training mode these return namedtuples (logits + auxiliary logits); pre-flight and a search step read them."""
    from slimrarts.models.io import attach_io
    from slimrarts.preflight import model_outputs
    from slimrarts.search.problem import NetProblem

    kwargs = {"aux_logits": True, "init_weights": True}
    model = create_model(name, num_classes=10, **kwargs)
    size = 299 if "inception" in name else 64
    x = torch.randn(2, 3, size, size)
    model.train()
    assert not isinstance(model(x), torch.Tensor)
    attach_io(model)
    assert model_outputs(model, x) == 10
    problem = NetProblem(model, [])
    loss = problem.loss(dict(model.named_parameters()), dict(model.named_buffers()), (x, torch.tensor([1, 2])))
    assert loss.dim() == 0 and torch.isfinite(loss)
