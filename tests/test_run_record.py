"""Nothing silent, round two (issue 22): a run's record says what produced its model, a resume checks what it
resumes, and one process at a time uses a run folder. Every refusal names the problem and changes nothing, in the run
folder or outside it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_recipe

import slimrarts
from slimrarts.cli import main
from slimrarts.data import DeviceLoader, ImageSet, Loaders, split_halves
from slimrarts.engine import fingerprint as fingerprint_module
from slimrarts.engine.rundir import RunDir
from slimrarts.engine.runlock import LOCK_FILE, check_unlocked, lock_run_dir
from slimrarts.errors import ResumeMismatchError, RunLockedError
from slimrarts.models import create_model
from slimrarts.runfolder import ResumeUncheckedWarning

ROOT = Path(__file__).resolve().parents[1]
HOLDER = Path(__file__).with_name("lock_holder.py")
TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal"], "ratio": 0.4},
        "report": {"latency": False}}


def _snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` with its modification time and bytes."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _loaders(train: ImageSet, test: ImageSet) -> Loaders:
    idx_t, idx_v = split_halves(train.labels)
    return Loaders(train=DeviceLoader(train, 25, train=True), test=DeviceLoader(test, 40, train=False),
                   search_t=DeviceLoader(train, 25, train=True, indices=idx_t, seed=1),
                   search_v=DeviceLoader(train, 25, train=True, indices=idx_v, seed=2))


def _model(seed: int = 0, name: str = "tiny_preresnet", **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def _prune(model, loaders, run_dir: Path, **kw):
    return slimrarts.prune(model, loaders, config=TINY, run_dir=run_dir, progress=False, **kw)


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, tiny_sets) -> Path:
    """A finished prune() run folder: tiny_preresnet (seed 0) on tiny_sets."""
    out = tmp_path_factory.mktemp("api") / "run"
    _prune(_model(), _loaders(*tiny_sets), out)
    return out


@pytest.fixture
def finished(api_run, tmp_path) -> Path:
    """A copy of `api_run` of this test's own (so what a test does to it stays there)."""
    out = tmp_path / "run"
    shutil.copytree(api_run, out)
    return out


def _segments(out: Path) -> list[dict]:
    return json.loads((out / "settings_history.json").read_text())["segments"]


# ---- 1. the record says what produced the model ----------------------------------------------------------------------

def test_a_finished_run_refuses_changed_settings_and_keeps_its_record(tmp_path, tiny_archive, capsys):
    """`--resume --set finetune.optim.lr=0.5` on a finished run would train nothing and only rewrite the record:
    refused, naming the key and saying the run is finished; recipe.yaml, report.json and slim.pt stay as they were."""
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["run", recipe, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main(["run", recipe, "--out", str(out), "--resume", "--set", "finetune.optim.lr=0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "finetune.optim.lr: 0.05 → 0.5" in err and "the run is finished" in err
    assert _snapshot(tmp_path) == before
    assert json.loads((out / "report.json").read_text())["settings"]["finetune"]["optim"]["lr"] == 0.05


def test_a_mid_run_resume_records_which_epochs_ran_under_which_values(tmp_path, tiny_archive, monkeypatch, capsys):
    """Interrupted before fine-tune epoch 1 was saved, resumed with another learning rate: the run's history says
    the start ran from search epoch 0 and the resume from fine-tune epoch 1 with lr 0.05 → 0.02; recipe.yaml keeps
    the settings the run started with (the change noted above them) and the report gives both."""
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    real = RunDir.save_checkpoint
    saved = []

    def interrupt_at_finetune_epoch_1(self, phase, payload):
        with pytest.raises(RunLockedError, match="this process"):  # held for the whole run
            check_unlocked(self.path)
        if phase == "finetune" and payload["epoch"] == 1:
            raise KeyboardInterrupt
        saved.append((phase, payload["epoch"]))
        real(self, phase, payload)

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", interrupt_at_finetune_epoch_1)
        assert main(["run", recipe, "--out", str(out), "--no-progress"]) == 130
    assert saved == [("search", 0), ("search", 1), ("finetune", 0)]
    check_unlocked(out)  # freed when the run stopped
    started_with = (out / "recipe.yaml").read_text()

    assert main(["run", recipe, "--out", str(out), "--resume", "--set", "finetune.optim.lr=0.02",
                 "--no-progress"]) == 0
    start, resume = _segments(out)
    assert (start["kind"], start["from"], start["changes"]) == ("start", {"phase": "search", "epoch": 0}, [])
    assert (resume["kind"], resume["from"]) == ("resume", {"phase": "finetune", "epoch": 1})
    assert resume["changes"] == [{"key": "finetune.optim.lr", "old": 0.05, "new": 0.02}]
    text = (out / "recipe.yaml").read_text()
    assert text.endswith(started_with) and "finetune.optim.lr 0.05 -> 0.02" in text.split(started_with)[0]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["finetune"]["optim"]["lr"] == 0.05 and report["settings_history"] == [start, resume]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [("search", 0), ("search", 1), ("finetune", 0),
                                                         ("finetune", 1)]

    # finished now: resuming with the values its last epochs ran with changes nothing and is allowed (it runs no
    # epoch); going back to the recipe's 0.05 would be a change nothing runs under, so it is refused
    assert main(["run", recipe, "--out", str(out), "--resume", "--set", "finetune.optim.lr=0.02",
                 "--no-progress"]) == 0
    again = _segments(out)[-1]
    assert (again["kind"], again["from"], again["changes"]) == ("resume", None, [])
    capsys.readouterr()
    assert main(["run", recipe, "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "finetune.optim.lr: 0.02 → 0.05" in capsys.readouterr().err


def test_a_dense_train_run_resumes_with_the_sections_it_does_not_read_changed(tmp_path, tiny_archive, monkeypatch,
                                                                            capsys):
    """`slimrarts train`, interrupted after its first epoch: a resume with other search and finetune settings (which
    a dense run never reads) continues and records them; one with another train.epochs is refused."""
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "dense"
    real = RunDir.save_checkpoint

    def interrupt_after_epoch_0(self, phase, payload):
        real(self, phase, payload)
        if payload["epoch"] == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_checkpoint", interrupt_after_epoch_0)
        assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 130
    capsys.readouterr()
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "train.epochs=3", "--no-progress"]) == 2
    assert "train.epochs: 2 → 3" in capsys.readouterr().err
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", "finetune.epochs=1", "--set",
                 "search.epochs=1", "--no-progress"]) == 0
    resume = _segments(out)[-1]
    assert resume["from"] == {"phase": "train", "epoch": 1}
    assert sorted(c["key"] for c in resume["changes"]) == ["finetune.epochs", "search.epochs"]
    assert (out / "model.pt").is_file()


# ---- 2. a resume checks what it resumes ------------------------------------------------------------------------------

@pytest.mark.parametrize("other, message", [
    (lambda: _model(name="tiny_resnet"),
     "the model differs from the one this run started from (ResNetCifar here, PreResNet in the run): parameter "),
    (lambda: _model(widths=(8, 8, 16)),
     "the model differs from the one this run started from: parameter conv1.weight has shape (8, 3, 3, 3) here, "
     "(4, 3, 3, 3) in the run"),
    (lambda: _model(seed=1), "the starting weights differ from the run's (sha256 "),
], ids=["architecture", "width", "weights"])
def test_api_resume_refuses_another_model(finished, tiny_sets, tmp_path, other, message):
    """prune(other_model, resume=True) on a run made from another model: refused naming what differs (it used to
    return the first run's slim model, or die with a raw KeyError)."""
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeMismatchError, match="cannot resume") as err:
        _prune(other(), _loaders(*tiny_sets), finished, resume=True)
    assert message in str(err.value)
    assert _snapshot(tmp_path) == before


def _fewer(train: ImageSet) -> ImageSet:
    return ImageSet(train.images[:144], train.labels[:144], classes=train.classes)


def _relabelled(train: ImageSet) -> ImageSet:
    labels = train.labels.clone()
    labels[0] = 1  # one sample of class 0 now in class 1
    return ImageSet(train.images, labels, classes=train.classes)


def _repainted(train: ImageSet) -> ImageSet:
    images = train.images.clone()
    images[0] = 255 - images[0]  # same size, same labels, another first image
    return ImageSet(images, train.labels, classes=train.classes)


@pytest.mark.parametrize("change, message", [
    (_fewer, "the training set has 144 samples here, 200 in the run"),
    (_relabelled, "the training set's labels differ: label 0 has 19 samples here, 20 in the run"),
    (_repainted, "the training set's samples at indices 0, 66, 133, 199 differ from the run's"),
], ids=["size", "labels", "samples"])
def test_api_resume_refuses_other_data(finished, tiny_sets, tmp_path, change, message):
    before = _snapshot(tmp_path)
    train, test = tiny_sets
    with pytest.raises(ResumeMismatchError, match="cannot resume") as err:
        _prune(_model(), _loaders(change(train), test), finished, resume=True)
    assert message in str(err.value)
    assert _snapshot(tmp_path) == before


def test_resume_refuses_another_slimrarts_version(finished, tiny_sets, tmp_path, monkeypatch):
    run_version = json.loads((finished / "fingerprint.json").read_text())["versions"]["slimrarts"]
    monkeypatch.setattr(fingerprint_module, "__version__", "9.9")
    before = _snapshot(tmp_path)
    with pytest.raises(ResumeMismatchError, match=f"slimrarts 9.9 here, {run_version} in the run"):
        _prune(_model(), _loaders(*tiny_sets), finished, resume=True)
    assert _snapshot(tmp_path) == before


def test_api_resume_of_the_same_run_passes_and_records_itself(finished, tiny_sets):
    """A resume of a finished run redoes nothing: the report's measured times and slim.pt stay as they were (before,
    the replay rewrote them: the probe's `search_wall 0.308 → 0.280`), and the report lists the resume."""
    before = json.loads((finished / "report.json").read_text())
    slim = (finished / "slim.pt").read_bytes()
    result = _prune(_model(), _loaders(*tiny_sets), finished, resume=True)
    kinds = [(s["kind"], s["from"]) for s in result.report["settings_history"]]
    assert kinds == [("start", {"phase": "search", "epoch": 0}), ("resume", None)]
    after = json.loads((finished / "report.json").read_text())
    assert after == result.report
    assert {k: v for k, v in after.items() if k != "settings_history"} == {
        k: v for k, v in before.items() if k != "settings_history"}
    assert (finished / "slim.pt").read_bytes() == slim


def test_cli_resume_refuses_changed_starting_weights(tmp_path, tiny_archive, capsys):
    """A recipe's model.weights file overwritten between the start and the resume: the starting weights differ."""
    weights = tmp_path / "start.pt"
    torch.save(_model(seed=0).state_dict(), weights)
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--set", f"model.weights={weights}", "--no-progress"]) == 0
    torch.save(_model(seed=1).state_dict(), weights)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert main(["train", recipe, "--out", str(out), "--resume", "--set", f"model.weights={weights}",
                 "--no-progress"]) == 2
    assert "the starting weights differ from the run's" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_a_folder_made_before_fingerprints_resumes_with_a_warning(finished, tiny_sets):
    (finished / "fingerprint.json").unlink()
    with pytest.warns(ResumeUncheckedWarning, match="could not be checked"):
        result = _prune(_model(), _loaders(*tiny_sets), finished, resume=True)
    assert result.report["settings_history"][-1]["kind"] == "resume"
    assert not (finished / "fingerprint.json").exists()  # what the run started from stays unknown


# ---- 3. one process per run folder -----------------------------------------------------------------------------------

def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock through the library's function (tests/lock_holder.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(HOLDER), str(folder)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_process_is_refused_while_another_holds_the_run_folder(tmp_path, tiny_archive, tiny_sets, capsys):
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    holder = _hold(out)
    try:
        capsys.readouterr()
        before = _snapshot(tmp_path)
        for flag in ("--resume", "--force"):
            assert main(["train", recipe, "--out", str(out), flag, "--no-progress"]) == 4
            err = capsys.readouterr().err
            assert f"run folder {str(out)!r} is in use by process {holder.pid} on host {socket.gethostname()} " \
                   "since " in err and "wait for it or use another --out" in err
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            _prune(_model(), _loaders(*tiny_sets), out, resume=True)
        assert _snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 0  # free again


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, tiny_archive):
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--no-progress"]) == 0
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead process's note stays
    t0 = time.monotonic()
    assert main(["train", recipe, "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 60


def test_one_process_cannot_take_a_run_folder_twice(tmp_path):
    with lock_run_dir(tmp_path / "run") as lock:
        lock.note_holder()
        with pytest.raises(RunLockedError, match="this process"):
            lock_run_dir(tmp_path / "run")
    lock_run_dir(tmp_path / "run").release()  # free once released
