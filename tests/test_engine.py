"""Engine: optimizers match torch.optim, schedules, fit with checkpoints, exact resume, and run folders."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from slimrarts._io import is_temp_name
from slimrarts.data import DeviceLoader
from slimrarts.engine import SGD, Adam, Callback, Event, evaluate, fit, load_checkpoint, lr_at, on, save_atomic
from slimrarts.engine.epochs import _to_device
from slimrarts.engine.fit import append_metrics, resolve_device, set_loader_epoch
from slimrarts.engine.rundir import MARKER, RunDir, _check_deletable, default_run_dir, foreign_entries
from slimrarts.models import create_model
from slimrarts.recipe import OptimConfig, TrainConfig


@pytest.mark.parametrize("ours, ref, kwargs", [
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    (SGD, torch.optim.SGD, dict(lr=0.3)),
    (Adam, torch.optim.Adam, dict(lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
])
def test_optimizers_match_torch(ours, ref, kwargs):
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa, ob = ours(a, **kwargs), ref(b, **kwargs)
    for it in range(6):
        for pa, pb in zip(a, b, strict=True):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g.clone(), g.clone()
        if it == 3:
            oa.set_lr(kwargs["lr"] / 3)
            for group in ob.param_groups:
                group["lr"] = kwargs["lr"] / 3
        oa.step()
        ob.step()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_optimizer_state_roundtrip_keeps_lr_tensor():
    p = [torch.randn(3, requires_grad=True)]
    opt = SGD(p, lr=0.1, momentum=0.9)
    p[0].grad = torch.ones(3)
    opt.step()
    opt.set_lr(0.02)
    other = SGD([p[0].detach().clone().requires_grad_()], lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    assert other.lr_tensor().item() == pytest.approx(0.02)
    torch.testing.assert_close(other.state[other.param_groups[0]["params"][0]]["momentum_buffer"], torch.ones(3))


def test_step_schedule_drops_at_fractions_of_epochs():
    kw = dict(base_lr=0.1, steps_per_epoch=10, epochs=160, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(799, **kw) == pytest.approx(0.1)
    assert lr_at(800, **kw) == pytest.approx(0.01)
    assert lr_at(1200, **kw) == pytest.approx(0.001)


def test_cosine_schedule_and_warmup():
    kw = dict(base_lr=1.0, steps_per_epoch=10, epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.5, abs=0.02)
    assert lr_at(99, **kw) < 0.01


def test_save_atomic_leaves_no_temp_files(tmp_path):
    save_atomic({"a": torch.ones(2), "n": 3}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt")["n"] == 3


def _setup(tiny_sets):
    train, test = tiny_sets
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    cfg = TrainConfig(epochs=3, optim=OptimConfig(lr=0.05, milestones=[0.5]), log_every=1)
    return model, DeviceLoader(train, 32, train=True, seed=3), DeviceLoader(test, 50, train=False), cfg


def test_fit_learns_and_writes_metrics(tiny_sets, tmp_path):
    model, train, test, cfg = _setup(tiny_sets)
    before = evaluate(model, test)
    result = fit(model, train, test, cfg=cfg, device="cpu", run_dir=tmp_path, progress=False)
    assert len(result.history) == 3
    assert result.final["test_acc"] > before["acc"] + 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert lines[-1]["lr"] == pytest.approx(0.005)


def test_plain_dataloader_works(tiny_sets):
    train, test = tiny_sets
    ds = torch.utils.data.TensorDataset(train.images.float() / 255, train.labels)
    dl = torch.utils.data.DataLoader(ds, batch_size=40, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    result = fit(model, dl, dl, cfg=TrainConfig(epochs=2, optim=OptimConfig(lr=0.1)), device="cpu", progress=False)
    assert result.final["train_n"] == len(ds)


def test_fit_records_each_epoch_and_evaluates_every_k(tiny_sets, tmp_path):
    """Per epoch: phase, epoch, lr at its end, the training meters over the images seen, and the test figures only
    every `eval_every` epochs and at the last; hooks run once per epoch/step; the checkpoint holds the history."""
    model, train, test, cfg = _setup(tiny_sets)
    starts, backward = [], []
    result = fit(model, train, test, cfg=cfg, device="cpu", run_dir=tmp_path, phase="tune", progress=False,
                 eval_every=2, callbacks=[on(Event.EPOCH_START, lambda state: starts.append(state.epoch)),
                                          on(Event.AFTER_BACKWARD, lambda state: backward.append(1))])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and result.final == lines[-1]
    assert [(r["phase"], r["epoch"], r["train_n"], r["cuda_graph"]) for r in lines] == [("tune", e, 192, False)
                                                                                       for e in range(3)]
    assert [("test_acc" in r, "test_loss" in r) for r in lines] == [(False, False), (True, True), (True, True)]
    assert lines[-1]["test_acc"] == evaluate(model, test)["acc"]
    assert [r["lr"] for r in lines] == pytest.approx([0.05, 0.005, 0.005])
    assert all(0 <= r["train_acc"] <= 1 and r["train_loss"] > 0 for r in lines)
    assert lines[0]["train_loss"] > lines[-1]["train_loss"]
    assert all(r["images_per_s"] == pytest.approx(r["train_n"] / r["epoch_s"]) for r in lines)
    assert starts == [0, 1, 2] and len(backward) == 3 * len(train)
    assert result.wall_s >= result.train_s == pytest.approx(sum(r["epoch_s"] for r in lines), rel=1e-6)
    assert result.images_per_s == pytest.approx(3 * 192 / result.train_s)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "tune.pt")
    assert ckpt["epoch"] == 2 and json.loads(ckpt["history"]) == lines
    assert ckpt["train_s"] == pytest.approx(result.train_s) and 0 < ckpt["wall_s"] <= result.wall_s
    with pytest.raises(ValueError, match="yields no batches"):
        fit(model, [], None, cfg=cfg, device="cpu", progress=False)


def test_resume_without_a_checkpoint_drops_that_phases_lines(tmp_path):
    """Lines of an epoch whose checkpoint never landed are dropped on resume; other phases' lines stay."""
    for rec in ({"phase": "search", "epoch": 0}, {"phase": "finetune", "epoch": 0}, {"phase": "finetune", "epoch": 1},
                {"phase": "search", "note": "a line without an epoch stays"}):
        append_metrics(tmp_path, rec)
    append_metrics(None, {"phase": "x"})  # no run folder: nothing written
    run = RunDir(tmp_path)
    assert len(run.metrics()) == 4
    assert [r.get("epoch") for r in run.metrics("finetune")] == [0, 1] and run.metrics("other") == []
    assert run.resume_checkpoint("finetune", torch.device("cpu")) is None
    assert run.metrics() == [{"phase": "search", "epoch": 0},
                             {"phase": "search", "note": "a line without an epoch stays"}]
    save_atomic({"epoch": 0, "rng": {"cpu": torch.get_rng_state()}, "history": [], "wall_s": 0.0},
                tmp_path / "checkpoints" / "search.pt")
    append_metrics(tmp_path, {"phase": "search", "epoch": 1})
    assert run.resume_checkpoint("search", torch.device("cpu"))["epoch"] == 0
    assert [r.get("epoch") for r in run.metrics()] == [0, None]


def test_set_loader_epoch_reaches_the_loader_or_its_sampler():
    class Seen:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

    ds = torch.utils.data.TensorDataset(torch.arange(8))
    sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
    set_loader_epoch(dl, 5)
    assert sampler.epoch == 5
    own = Seen()
    own.sampler = Seen()
    set_loader_epoch(own, 3)  # the loader's own set_epoch, and only that
    assert own.epochs == [3] and own.sampler.epochs == []
    holder = type("Holder", (), {})()
    holder.batch_sampler = Seen()
    set_loader_epoch(holder, 2)
    assert holder.batch_sampler.epochs == [2]
    set_loader_epoch([1, 2], 1)  # nothing to tell: no error


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_the_loops_schedule_and_sgd_follow_their_config():
    """schedule_fn passes every schedule setting to lr_at; build_sgd every optimizer setting to SGD."""
    from slimrarts.engine.fit import build_sgd
    from slimrarts.engine.schedule import schedule_fn as _lr_fn

    cfg = OptimConfig(lr=0.4, momentum=0.7, weight_decay=3e-4, nesterov=True, schedule="cosine", warmup_epochs=2,
                      min_lr=0.01, milestones=[0.3], gamma=0.2)
    fn = _lr_fn(cfg, 5, 10)
    for step in (0, 3, 9, 10, 27, 49):
        assert fn(step) == lr_at(step, base_lr=0.4, steps_per_epoch=5, epochs=10, schedule="cosine",
                                 milestones=[0.3], gamma=0.2, warmup_epochs=2, min_lr=0.01)
    assert fn(0) < fn(9) and fn(49) > 0.01 - 1e-12
    step_fn = _lr_fn(OptimConfig(lr=0.4, milestones=[0.3], gamma=0.2), 5, 10)
    assert (step_fn(14), step_fn(15)) == (pytest.approx(0.4), pytest.approx(0.08))
    opt = build_sgd([torch.zeros(2, requires_grad=True)], cfg)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.4, 0.7, 3e-4, True)


def test_save_atomic_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"n": 1}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_atomic({"n": 2, "bad": lambda: 0}, path)  # cannot be pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"] and load_checkpoint(path)["n"] == 1
    save_atomic({"n": 3}, tmp_path / "new" / "d.pt")  # creates the folder
    assert load_checkpoint(tmp_path / "new" / "d.pt")["n"] == 3


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    import argparse

    torch.save({"epoch": 0, "x": argparse.Namespace(a=1)}, tmp_path / "c.pt")
    with pytest.raises(Exception, match="cannot be read .UnpicklingError"):
        load_checkpoint(tmp_path / "c.pt")


# ---- run folders: default place, what --force may delete, reading back ----------------------------------------

def test_default_run_dir_is_a_timestamped_folder_under_runs(tmp_path):
    path = default_run_dir("width", tmp_path)
    assert path.parent == tmp_path / "width" and not path.exists()
    stamp = dt.datetime.strptime(path.name, "%Y%m%d-%H%M%S")
    assert abs((dt.datetime.now() - stamp).total_seconds()) < 120
    assert default_run_dir("x").parts[:2] == ("runs", "x")  # relative to the working folder by default


def test_default_run_dir_counts_up_from_one(tmp_path, monkeypatch):
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 29, 21, 5, 7)

    monkeypatch.setattr("slimrarts.engine.rundir._dt.datetime", Frozen)
    assert default_run_dir("w", tmp_path) == tmp_path / "w" / "20261129-210507"
    (tmp_path / "w" / "20261129-210507").mkdir(parents=True)
    assert default_run_dir("w", tmp_path) == tmp_path / "w" / "20261129-210507-1"
    (tmp_path / "w" / "20261129-210507-1").mkdir()
    assert default_run_dir("w", tmp_path) == tmp_path / "w" / "20261129-210507-2"


def test_only_interrupted_atomic_writes_count_as_temporary():
    assert is_temp_name(".report.json.123.tmp")
    assert not is_temp_name("report.json.tmp")  # not hidden: a user's file
    assert not is_temp_name(".hidden")  # hidden, but not ours
    assert not is_temp_name(".notes.TMP")


def _run_folder(path):
    path.mkdir()
    (path / MARKER).write_text("{}")
    for name in ("recipe.yaml", "metrics.jsonl", ".report.json.9.tmp"):
        (path / name).write_text("x")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "search.pt").write_text("x")
    (path / "checkpoints" / ".search.pt.7.tmp").write_text("x")
    return path


def test_foreign_entries_are_what_slimrarts_did_not_write(tmp_path):
    run = _run_folder(tmp_path / "run")
    assert foreign_entries(run) == []
    (run / "notes.txt").write_text("mine")
    (run / "a-notes.txt").write_text("mine")  # sorted before checkpoints/: must not be lost when that is read
    (run / "checkpoints" / "best.ckpt").write_text("mine")  # a suffix slimrarts never writes there
    (run / "checkpoints" / "sub").mkdir()  # a folder inside checkpoints/
    (run / "data").mkdir()  # a folder slimrarts does not make
    os.symlink(tmp_path, run / "link")
    assert foreign_entries(run) == [run / "a-notes.txt", run / "checkpoints" / "best.ckpt", run / "checkpoints" / "sub",
                                    run / "data", run / "link", run / "notes.txt"]
    os.symlink(run / "checkpoints" / "search.pt", run / "checkpoints" / "other.pt")  # a link, even named .pt
    assert run / "checkpoints" / "other.pt" in foreign_entries(run)


def test_force_names_the_first_five_foreign_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _run_folder(tmp_path / "run")
    for i in range(6):
        (run / f"user{i}.txt").write_text("mine")
    with pytest.raises(FileExistsError) as err:
        _check_deletable(run)
    msg = str(err.value)
    assert "(user0.txt, user1.txt, user2.txt, user3.txt, user4.txt …)" in msg and "user5" not in msg


def test_run_dir_reads_as_a_path_and_writes_text_atomically(tmp_path):
    rd = RunDir(tmp_path)
    assert os.fspath(rd) == str(tmp_path) and repr(rd) == f"RunDir({str(tmp_path)!r})"
    path = rd.write_text("genotype.txt", "normal: sep_conv_3x3\n")
    assert path == tmp_path / "genotype.txt" and path.read_text() == "normal: sep_conv_3x3\n"
    assert [p.name for p in tmp_path.iterdir()] == ["genotype.txt"]  # no temporary file left behind


def test_run_dir_saves_tensors_atomically(tmp_path):
    saved = RunDir(tmp_path).save_tensors("alphas.pt", {"a": torch.arange(3.0)})
    assert saved == tmp_path / "alphas.pt" and torch.equal(torch.load(saved)["a"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["alphas.pt"]


def test_a_checkpoint_moves_to_the_device_through_dicts_lists_and_tuples():
    meta = torch.device("meta")
    ckpt = {"w": torch.ones(2), "opt": [torch.zeros(1), (torch.ones(3), "sgd")], "epoch": 4}
    moved = _to_device(ckpt, meta)
    assert moved["w"].device == meta and moved["epoch"] == 4
    assert isinstance(moved["opt"], list) and moved["opt"][0].device == meta
    assert isinstance(moved["opt"][1], tuple) and moved["opt"][1][0].device == meta and moved["opt"][1][1] == "sgd"
    assert ckpt["w"].device == torch.device("cpu")  # the original stays where it was


def test_in_a_process_group_rank_zero_reads_the_checkpoint_for_every_rank(tmp_path):
    """`_resume` inside a (one-process gloo) group: the checkpoint comes through `dist.from_main`, the RNG is
    restored from it, and its tensors land on the asked device."""
    import torch.distributed as tdist

    from slimrarts.engine.epochs import _resume

    torch.manual_seed(5)
    state = torch.get_rng_state()
    save_atomic({"epoch": 2, "rng": {"cpu": state}, "history": [], "wall_s": 1.5, "w": torch.ones(3)},
                tmp_path / "checkpoints" / "search.pt")
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(9)
        ckpt = _resume(RunDir(tmp_path), "search", torch.device("meta"))
        assert torch.equal(torch.get_rng_state(), state)
        assert ckpt["epoch"] == 2 and ckpt["wall_s"] == 1.5 and ckpt["w"].device == torch.device("meta")
        assert _resume(RunDir(tmp_path), "finetune", torch.device("cpu")) is None  # no checkpoint of that phase
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("writer", ["checkpoint", "text"])
def test_atomic_writes_go_through_a_temporary_file_that_a_run_folder_recognises(tmp_path, monkeypatch, writer):
    """The file appears only by a rename from a hidden `.<name>.*.tmp` beside it (which --force may delete when an
    interrupted write leaves it); missing parent folders are made."""
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "new" / "deeper" / "file.out"
    if writer == "checkpoint":
        save_atomic({"x": torch.ones(2)}, target)
    else:
        RunDir(tmp_path / "new" / "deeper").write_text("file.out", "hello\n")
    [(src, dst)] = renames
    assert Path(dst) == target and Path(src).parent == target.parent
    assert Path(src).name.startswith(".file.out.") and is_temp_name(Path(src).name)
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.out"]


def test_a_callback_that_does_not_listen_to_step_end_is_not_asked_every_step(tiny_sets):
    """Per-step dispatch is only set up for callbacks that declare STEP_END (no Python call per step otherwise)."""
    model, train, test, cfg = _setup(tiny_sets)
    asked = []

    class EpochOnly(Callback):
        events = (Event.EPOCH_END,)

        def match(self, event, state):
            asked.append(event)
            return super().match(event, state)

        def apply(self, event, state):
            records.append(state.record)

    records = []
    result = fit(model, train, test, cfg=dataclasses.replace(cfg, epochs=1), device="cpu", progress=False,
                 callbacks=[EpochOnly()])
    assert Event.EPOCH_END in asked and Event.STEP_END not in asked
    assert records == result.history  # at EPOCH_END a callback reads the epoch's record


def test_a_stopping_rule_is_kept_across_a_resume(tiny_sets, tmp_path):
    """A callback that stops the phase after epoch 0 of 3: the checkpoint records the stop, so a resume runs no more
    epochs and keeps the time spent."""
    model, train, test, cfg = _setup(tiny_sets)

    def stop(state):
        state.stop = True

    first = fit(model, train, test, cfg=cfg, device="cpu", run_dir=tmp_path, progress=False,
                callbacks=[on(Event.EPOCH_END, stop)])
    assert [r["epoch"] for r in first.history] == [0]
    again = fit(model, train, test, cfg=cfg, device="cpu", run_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in again.history] == [0] and again.train_s == pytest.approx(first.train_s)
    assert len(RunDir(tmp_path).metrics()) == 1
