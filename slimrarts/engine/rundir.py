"""Run folders: created fresh, resumed, or replaced only when asked; and `RunDir`, the one writer of their files.

Every file a run leaves goes through `RunDir`: `metrics.jsonl` (one line per epoch and phase), checkpoints
(`checkpoints/<phase>.pt`, written atomically), and JSON/text results written through a temporary file and a
rename, so an interruption never leaves a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint, save_atomic, set_rng_state

__all__ = ["RUN_MARKERS", "RunDir", "default_run_dir", "prepare_run_dir"]

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


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDir:
    """The files of one run folder; `RunDir.of(None)` is None so callers can pass an optional folder through."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | os.PathLike | RunDir | None) -> RunDir | None:
        if path is None or isinstance(path, RunDir):
            return path
        return cls(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- results -------------------------------------------------------------------------------------------------

    def write_json(self, name: str, data: Any, indent: int | None = 1) -> Path:
        """Write `name` as JSON, atomically."""
        path = self.path / name
        _atomic_text(path, json.dumps(data, indent=indent) + "\n")
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write `name` as text, atomically."""
        path = self.path / name
        _atomic_text(path, text)
        return path

    def save_tensors(self, name: str, obj: Any) -> Path:
        """`torch.save` `obj` (tensors and plain data) to `name`, atomically."""
        path = self.path / name
        save_atomic(obj, path)
        return path

    # ---- metrics ---------------------------------------------------------------------------------------------------

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to `metrics.jsonl`."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def metrics(self, phase: str | None = None) -> list[dict]:
        """The lines of `metrics.jsonl` (of one phase, if given)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        return [r for r in lines if phase is None or r.get("phase") == phase]

    def _drop_metrics_after(self, phase: str, epoch: int) -> None:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines
                if not (json.loads(ln).get("phase") == phase and json.loads(ln).get("epoch", -1) > epoch)]
        if len(keep) != len(lines):
            _atomic_text(path, "".join(ln + "\n" for ln in keep))

    # ---- checkpoints -----------------------------------------------------------------------------------------------

    def checkpoint_path(self, phase: str) -> Path:
        return self.path / "checkpoints" / f"{phase}.pt"

    def save_checkpoint(self, phase: str, payload: dict) -> None:
        """Write the phase's checkpoint atomically (the previous one stays until the new one is complete)."""
        save_atomic(payload, self.checkpoint_path(phase))

    def resume_checkpoint(self, phase: str, device: torch.device) -> dict | None:
        """The checkpoint of `phase` to continue from (RNG restored, metrics lines after it dropped), or None.

        Without a checkpoint, lines of this phase left by an epoch whose checkpoint never landed are dropped too.
        """
        path = self.checkpoint_path(phase)
        if not path.exists():
            self._drop_metrics_after(phase, -1)
            return None
        ckpt = load_checkpoint(path, map_location=device)
        set_rng_state(ckpt["rng"])
        self._drop_metrics_after(phase, ckpt["epoch"])
        return ckpt
