"""Shared bits of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import torch

from slimrarts._io import atomic_write
from slimrarts.timing import device_name

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> dict:
    """What ran the benchmark."""
    info = {"date": dt.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu": device_name("cpu"),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = device_name(device)
    return info


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return device_name(device).split()[-1].lower()
    return "cpu"


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write(path, json.dumps(payload, indent=1))  # an interrupted write never leaves half a results file
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finished_or_resume(recipe, run_dir: Path, unread: tuple[str, ...] = ()) -> tuple[dict | None, bool]:
    """A finished run's report (reused only if `recipe` asks for what it ran: `recipe.resume_changes` refuses other
    settings, naming them), else whether an unfinished run is there to resume."""
    from slimrarts.recipe import resume_changes

    done = run_dir / "report.json"
    if done.is_file():
        resume_changes(recipe, run_dir, unread=unread)
        return json.loads(done.read_text()), False
    return None, run_dir.exists() and any(run_dir.iterdir())


def run_baseline(recipe, run_dir: Path, progress: bool) -> dict:
    """`slimrarts train` of `recipe` in `run_dir`: the report of a finished run, else a (resumed) run's."""
    from slimrarts.commands.width import TRAIN_UNREAD, train_recipe

    report, resume = _finished_or_resume(recipe, run_dir, TRAIN_UNREAD)
    if report is not None:
        return report
    return train_recipe(recipe, run_dir, resume=resume, progress=progress)


def run_prune(recipe, run_dir: Path, progress: bool) -> dict:
    """`slimrarts run` of `recipe` in `run_dir`: the report of a finished run, else a (resumed) run's."""
    from slimrarts.commands.width import prune_recipe

    report, resume = _finished_or_resume(recipe, run_dir)
    if report is not None:
        return report
    return prune_recipe(recipe, run_dir, resume=resume, progress=progress)
