"""Run folders: created fresh, resumed, or replaced only when asked; never silently overwritten."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path

__all__ = ["prepare_run_dir", "default_run_dir", "RUN_MARKERS"]

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "report.json", "checkpoints")


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """`runs/<name>/<YYYYmmdd-HHMMSS>` (a new folder per run)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / name / stamp
    i = 1
    while path.exists():
        path = Path(root) / name / f"{stamp}-{i}"
        i += 1
    return path


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, force: bool = False) -> Path:
    """Make `path` ready for a run.

    A missing or empty folder is created. An existing non-empty folder is an error unless `resume` (continue it)
    or `force` (delete it first; only a folder that looks like a slimrarts run, so no other data is ever removed).
    """
    path = Path(path)
    if resume and force:
        raise ValueError("resume and force exclude each other: resume continues a run, force starts it again")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run folder {str(path)!r} exists and is not a folder")
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not force:
            raise FileExistsError(f"run folder {str(path)!r} already holds a run; pass --resume to continue it, "
                                  "--force to start it again (deleting it), or choose another --out")
        if not any((path / m).exists() for m in RUN_MARKERS):
            raise FileExistsError(f"{str(path)!r} is not empty and does not look like a slimrarts run folder; "
                                  "refusing to delete it even with --force")
        shutil.rmtree(path)
    elif resume:
        raise FileNotFoundError(f"nothing to resume: run folder {str(path)!r} does not exist or is empty")
    path.mkdir(parents=True, exist_ok=True)
    return path
