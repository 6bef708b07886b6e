"""Run folders: created fresh, resumed, or replaced only when asked; and `RunDir`, the one writer of their files.

Every file a run leaves goes through `RunDir`: `metrics.jsonl` (one line per epoch and phase), checkpoints
(`checkpoints/<phase>.pt`, written atomically), and JSON/text results written through a temporary file and a
rename, so an interruption never leaves a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, is_temp_name
from ..errors import CorruptFileError, FileProblem, InputError, MissingFileError, RunFolderError
from .checkpoint import load_checkpoint, save_atomic, set_rng_state
from .runlock import LOCK_FILE, check_unlocked

__all__ = ["FINGERPRINT", "HISTORY", "MARKER", "RUN_MARKERS", "RunDir", "check_run_dir", "default_run_dir",
           "foreign_entries", "prepare_run_dir"]

MARKER = ".slimrarts-run"  # written into every run folder at creation; --force deletes only folders holding it
RUN_MARKERS = (MARKER,)
FINGERPRINT = "fingerprint.json"  # the model, data and versions the run started from (checked on resume)
HISTORY = "settings_history.json"  # every start and resume: where it continued, which settings it changed
# what slimrarts writes into a run folder: the only entries --force may delete (the lock file it keeps)
RUN_FILES = frozenset({
    MARKER, LOCK_FILE, "recipe.yaml", "recipe_changes.json", FINGERPRINT, HISTORY, "metrics.jsonl", "report.json",
    "width_spec.json", "alphas.json", "slim.pt", "model.pt", "genotype.json", "genotype.txt", "cells.png",
    "costs.json", "widths.png", "alphas.png", "latency.json",
    "export.json", "slim.onnx", "slim.int8.onnx", "slim.pt2",  # `slimrarts export`'s record and default files
})
RUN_DIRS = {"checkpoints": (".pt",)}  # folders slimrarts writes, and the suffixes of the files it puts there


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """`runs/<name>/<YYYYmmdd-HHMMSS>` (a new folder per run)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / name / stamp
    i = 1
    while path.exists():
        path = Path(root) / name / f"{stamp}-{i}"
        i += 1
    return path


def foreign_entries(path: Path) -> list[Path]:
    """Entries of run folder `path` that slimrarts did not write (so --force must not delete them)."""
    out = []
    for entry in sorted(path.iterdir()):
        if entry.is_symlink():
            out.append(entry)
        elif entry.is_dir() and entry.name in RUN_DIRS:
            out += [f for f in sorted(entry.iterdir()) if f.is_symlink() or not f.is_file()
                    or not (f.suffix in RUN_DIRS[entry.name] or is_temp_name(f.name))]
        elif not (entry.is_file() and (entry.name in RUN_FILES or is_temp_name(entry.name))):
            out.append(entry)
    return out


def _check_deletable(path: Path) -> None:
    """Refuse --force on anything but a folder slimrarts made and filled itself."""
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise RunFolderError(f"--force would delete {str(path)!r}, which is the current folder or one of its "
                             "parents; refusing. Choose another --out")
    if not (path / MARKER).is_file():
        raise RunFolderError(f"{str(path)!r} is not empty and was not made by slimrarts (it has no {MARKER} "
                             "file); refusing to delete it even with --force. Choose another --out")
    foreign = foreign_entries(path)
    if foreign:
        names = ", ".join(str(f.relative_to(path)) for f in foreign[:5])
        raise RunFolderError(f"run folder {str(path)!r} holds files slimrarts did not write ({names}"
                             f"{' …' if len(foreign) > 5 else ''}); refusing to delete them with --force. Move them "
                             "away or choose another --out")


def _clear_run(path: Path) -> None:
    """Delete what slimrarts wrote in `path` (checked by `_check_deletable`); the folder, its marker and its lock
    file (which the process clearing it holds) stay."""
    for entry in path.iterdir():
        if entry.is_dir():
            for f in entry.iterdir():
                f.unlink()
            entry.rmdir()
        elif entry.name not in (MARKER, LOCK_FILE):
            entry.unlink()


def _holds_a_run(path: Path) -> bool:
    """Whether folder `path` holds anything but the lock file (which stays when a run is started again)."""
    return path.exists() and any(entry.name != LOCK_FILE for entry in path.iterdir())


def _write_marker(path: Path) -> None:
    from ..version import __version__

    (path / MARKER).write_text(json.dumps({"slimrarts": __version__,
                                           "created": _dt.datetime.now().isoformat(timespec="seconds")}) + "\n")


def check_run_dir(path: str | os.PathLike, *, resume: bool = False, force: bool = False,
                  locked: bool = False) -> Path:
    """What `prepare_run_dir` would do, without changing anything: raises if the folder cannot be used as asked
    (`RunLockedError` while another live process holds it; `locked`: this process holds it, see `runlock`)."""
    path = Path(path)
    if resume and force:
        raise InputError("resume and force exclude each other: resume continues a run, force starts it again")
    if path.is_symlink() and not path.exists():
        raise RunFolderError(f"run folder {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                             "exist: create that folder, or choose another --out")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run folder {str(path)!r} exists and is not a folder")
    if not locked:
        check_unlocked(path)
    busy = _holds_a_run(path)
    if busy and not force and not (path / MARKER).is_file():
        names = ", ".join(sorted(e.name for e in path.iterdir())[:5])
        raise RunFolderError(f"{str(path)!r} is not empty ({names}) and is not a run folder slimrarts made: "
                             "choose another --out (slimrarts never writes into or deletes a folder of yours)")
    if busy and resume:
        if not (path / "recipe.yaml").is_file():
            raise MissingFileError(f"cannot resume {str(path)!r}: its recipe.yaml is missing, so the settings it "
                                   "ran with cannot be checked; restore the file, or start again with --force")
    elif busy and not force:
        raise RunFolderError(f"run folder {str(path)!r} already holds a run; pass --resume to continue it, "
                             "--force to start it again (deleting it), or choose another --out")
    elif busy:
        _check_deletable(path)
    elif resume:
        raise MissingFileError(f"nothing to resume: run folder {str(path)!r} does not exist or is empty")
    return path


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, force: bool = False,
                    locked: bool = False) -> Path:
    """Make `path` ready for a run, after every check of `check_run_dir`.

    A missing or empty folder is created (with the marker file that makes it a slimrarts run folder). An existing
    non-empty folder is an error unless `resume` (continue it; it must hold its recipe.yaml) or `force` (start
    again: only in a folder slimrarts made, deleting only the files slimrarts wrote there, never the current
    folder or a parent of it; any other file makes it refuse, naming the file). A run holds the folder's lock
    around this (`slimrarts.runfolder.open_run`; `locked` says it does).
    """
    path = check_run_dir(path, resume=resume, force=force, locked=locked)
    if _holds_a_run(path):
        if resume:
            return path
        _clear_run(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        _write_marker(path)
    return path


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
        atomic_write(path, json.dumps(data, indent=indent) + "\n")
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write `name` as text, atomically."""
        path = self.path / name
        atomic_write(path, text)
        return path

    def save_tensors(self, name: str, obj: Any) -> Path:
        """`torch.save` `obj` (tensors and plain data) to `name`, atomically."""
        path = self.path / name
        save_atomic(obj, path)
        return path

    def read_json(self, name: str, what: str) -> Any:
        """The JSON file `name` (None if missing); a damaged one fails naming it (`what` says what it holds)."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{str(path)!r} ({what}) is damaged ({type(err).__name__}); restore it, or start "
                                   "the run again with --force") from None

    # ---- the run's record: every start and resume ------------------------------------------------------------------

    def history(self) -> list[dict]:
        """The segments of `settings_history.json`, oldest first ([] for a folder made before it existed).

        A segment is one start or resume: `kind` (start | resume), `time`, `pid`, `host`, `slimrarts` (version),
        `changes` (`{key, old, new}` for each setting it changed from those the epochs before it ran with) and
        `from` (`{phase, epoch}`: the first epoch it ran; null while it ran none: it stopped before its first
        epoch, or nothing was left to run)."""
        data = self.read_json(HISTORY, "the run's settings history")
        if data is None:
            return []
        segments = data.get("segments") if isinstance(data, dict) else None
        if not isinstance(segments, list) or not all(isinstance(s, dict) for s in segments):
            raise FileProblem(f"{self.path / HISTORY} is not a settings history (a mapping whose 'segments' is a list "
                              "of mappings); it is damaged: restore it, or start the run again with --force")
        return list(segments)

    def begin_segment(self, kind: str, changes: list[dict]) -> dict:
        """Append a segment to `settings_history.json` (see `history`) and return it."""
        from ..version import __version__

        segments = self.history()
        segment = {"segment": len(segments), "kind": kind,
                   "time": _dt.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
                   "host": socket.gethostname(), "slimrarts": __version__, "changes": changes, "from": None}
        self.write_json(HISTORY, {"segments": [*segments, segment]})
        return segment

    def note_first_epoch(self, phase: str, epoch: int) -> None:
        """Record the first epoch the current segment runs (once: later phases of the same process leave it)."""
        if not (self.path / HISTORY).is_file():
            return
        segments = self.history()
        if segments and segments[-1].get("from") is None:
            segments[-1]["from"] = {"phase": phase, "epoch": epoch}
            self.write_json(HISTORY, {"segments": segments})

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
        lines = [json.loads(ln) for ln in self._metric_lines()[0]]
        return [r for r in lines if phase is None or r.get("phase") == phase]

    def _metric_lines(self) -> tuple[list[str], bool]:
        """The complete lines of `metrics.jsonl`, and whether a last line cut short (a process killed, or a full
        disk, in the middle of an append) was dropped (with a warning, so the resume rewrites the file); a damaged
        line elsewhere fails naming the file and the line."""
        path = self.path / "metrics.jsonl"
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        for i, ln in enumerate(lines):
            try:
                json.loads(ln)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    warnings.warn(f"{path}: its last line was cut short (an interrupted write); it is dropped",
                                  RuntimeWarning, stacklevel=3)
                    return lines[:-1], True
                raise FileProblem(f"{path}: line {i + 1} is not valid JSON; the file is damaged (remove that line "
                                  "to continue)") from None
        return lines, False

    def _drop_metrics_after(self, phase: str, epoch: int) -> None:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        lines, cut_short = self._metric_lines()
        keep = [ln for ln in lines
                if not (json.loads(ln).get("phase") == phase and json.loads(ln).get("epoch", -1) > epoch)]
        if len(keep) != len(lines) or cut_short:
            atomic_write(path, "".join(ln + "\n" for ln in keep))

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
        remedy = (f"delete {path} to run the {phase!r} phase again from its start (earlier phases are kept), or "
                  "start the whole run again with --force")
        ckpt = load_checkpoint(path, map_location=device, what=f"{phase!r} checkpoint", remedy=remedy,
                               keys=("epoch", "rng", "history", "wall_s"))
        set_rng_state(ckpt["rng"])
        self._drop_metrics_after(phase, ckpt["epoch"])
        return ckpt
