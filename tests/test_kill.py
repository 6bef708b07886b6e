"""`kill -9` of a real `slimrarts run` process at a random point, then `--resume`: the same slim weights as a run
that was never interrupted. Unlike the other resume tests (an exception raised inside the loop), nothing in the
process gets to clean up: whatever was half-written when the signal came (a checkpoint, metrics.jsonl) must not
matter."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, archive: str) -> Path:
    data = {"name": "killed", "seed": 0, "device": "cpu",
            "data": {"name": "cifar10", "root": archive, "batch_size": 16, "eval_batch_size": 40},
            "model": {"name": "tiny_preresnet"},
            "search": {"epochs": 3, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
            "prune": {"ratio": 0.4, "scope": ["internal"]},
            "finetune": {"epochs": 3, "optim": {"lr": 0.05}}, "report": {"latency": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "slimrarts", "run", str(recipe), "--out", str(out), "--no-progress",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _slim(out: Path) -> dict:
    return torch.load(out / "slim.pt", weights_only=True)["state_dict"]


def _kill_during_training(proc: subprocess.Popen, out: Path, rng: random.Random) -> None:
    """SIGKILL at a random moment after the first search checkpoint landed (so there is something to resume)."""
    first = out / "checkpoints" / "search.pt"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run wrote no checkpoint in 120 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_archive, seed):
    recipe = _recipe(tmp_path, tiny_archive)
    whole = _cli(recipe, tmp_path / "whole")
    killed = _cli(recipe, tmp_path / "killed")
    _kill_during_training(killed, tmp_path / "killed", random.Random(seed))
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()
    if killed.returncode == 0:  # it finished before the signal: nothing was tested
        pytest.fail("the run ended before the kill; lengthen the recipe")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "slim.pt").exists()
    resumed = _cli(recipe, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a, b = _slim(tmp_path / "whole"), _slim(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_after_a_divergence_stop_then_resume(tmp_path, tiny_archive):
    """A run stopped by divergence (exit 3), resumed with a safe learning rate, killed again, resumed again: the
    slim weights of a run made with that learning rate from the start."""
    recipe = _recipe(tmp_path, tiny_archive)
    whole = _cli(recipe, tmp_path / "whole")
    diverged = _cli(recipe, tmp_path / "run", "--set", "search.optim.lr=1e6")
    assert diverged.wait(timeout=300) == 3, diverged.stderr.read().decode()
    assert not (tmp_path / "run" / "checkpoints" / "search.pt").exists()
    resumed = _cli(recipe, tmp_path / "run", "--resume", "--set", "search.optim.lr=0.05")
    _kill_during_training(resumed, tmp_path / "run", random.Random(3))
    assert resumed.returncode == -signal.SIGKILL and not (tmp_path / "run" / "slim.pt").exists()
    again = _cli(recipe, tmp_path / "run", "--resume", "--set", "search.optim.lr=0.05")
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()
    a, b = _slim(tmp_path / "whole"), _slim(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
