"""Opening a run folder for one run: the one place every command and `prune()` starts or resumes a run.

`open_run(path, recipe, resume=..., force=..., model=..., loaders=...)`, once the model and the data passed their own
checks, in this order and on rank 0 alone under torchrun (its errors are raised on every rank):

1. the folder can be used as asked (`engine.rundir.check_run_dir`) and no live process holds it;
2. its lock is taken for the whole run (`engine.runlock`: a second process is refused with `RunLockedError`);
3. on resume, what the run started from is compared with what is here (`fingerprint.json`, `engine.fingerprint`)
   and a difference is refused with `ResumeMismatchError` naming it; a folder made before fingerprints were
   recorded resumes with a warning that nothing could be checked;
4. on resume, the settings are compared with those the run last ran with (`recipe.resume_changes`): other settings
   are refused, except the resume-safe keys, and a finished run refuses those too;
5. the folder is made (or cleared, with `force`) and the run's record written: a new run's `recipe.yaml`,
   `fingerprint.json` and first segment of `settings_history.json`; a resume's segment with the settings it
   changes (and those changes as comments atop `recipe.yaml`, whose settings stay the ones the run started with).
   `run_epochs` fills in each segment's first epoch.

Nothing is written before every check has passed, so a refused run leaves the folder as it was.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from .engine import dist
from .engine.fingerprint import differences, fingerprint
from .engine.rundir import FINGERPRINT, RunDir, check_run_dir, prepare_run_dir
from .engine.runlock import RunLock, lock_run_dir
from .errors import ResumeMismatchError
from .recipe import apply_settings, dump_recipe, legacy_settings, note_changes_in_recipe, resume_changes

__all__ = ["OpenRun", "ResumeUncheckedWarning", "open_run"]


class ResumeUncheckedWarning(UserWarning):
    """A run folder made before slimrarts recorded fingerprints was resumed: its model, data and versions were not
    checked."""


class OpenRun:
    """A run folder this process has opened: `close()` (or leaving a `with` block) frees its lock. Under torchrun
    only rank 0 holds the lock; `close()` does nothing on the other ranks."""

    def __init__(self, path: Path, lock: RunLock | None, finished: bool = False):
        self.path, self.lock = path, lock
        self.finished = finished  # a resume of a run that had finished (its report.json was there): nothing to redo

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenRun({str(self.path)!r}, locked={self.lock is not None and self.lock.held})"


def _check_fingerprint(rd: RunDir, here: dict) -> None:
    stored = rd.read_json(FINGERPRINT, "what the run started from")
    if stored is None:
        warnings.warn(f"{rd.path} was made before slimrarts recorded what a run starts from (it has no {FINGERPRINT}): "
                      "the model, the data and the versions of this resume could not be checked against the run's",
                      ResumeUncheckedWarning, stacklevel=4)
        return
    found = differences(stored, here)
    if found:
        raise ResumeMismatchError(f"cannot resume {str(rd.path)!r}: {'; '.join(found)}. Resume with the model, data "
                                  "and versions this run started from, or start a new run (another --out, or "
                                  "--force to replace this one)")


def _json(data: Any) -> str:
    """`data` as indented JSON with each list of numbers (a shape, a histogram) on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s+([-\d.,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",")
                  + "]", text) + "\n"


def _earlier_changes(rd: RunDir) -> list[tuple[str, Any]]:
    return [(c["key"], c["new"]) for seg in rd.history() for c in seg.get("changes", [])]


def open_run(path: str | os.PathLike, recipe: Any, *, resume: bool = False, force: bool = False,
             model: nn.Module | None = None, loaders: Any = None, unread: tuple[str, ...] = ()) -> OpenRun:
    """Check, lock and make (or resume) the run folder `path` for a run of `recipe` starting from `model` (None: a
    net built from the recipe alone) on `loaders` (see the module docstring); a resume may change the recipe
    sections `unread` (`recipe.resume_changes`). Returns the `OpenRun` whose `close()` frees the folder; on any
    error nothing is held."""
    path = Path(path)
    held: list[RunLock] = []

    def on_main() -> dict:
        check_run_dir(path, resume=resume, force=force)  # before the lock: nothing is created for a refused run
        here = fingerprint(model, loaders)
        lock = lock_run_dir(path)
        try:
            check_run_dir(path, resume=resume, force=force, locked=True)  # as it is now that no one else can act
            rd = RunDir(path)
            changes: list[tuple[str, Any, Any]] = []
            legacy: dict[str, Any] = {}
            finished = resume and (path / "report.json").is_file()
            if resume:
                _check_fingerprint(rd, here)
                changes = resume_changes(recipe, path, earlier=_earlier_changes(rd), finished=finished,
                                         unread=unread)
                legacy = legacy_settings(recipe, path)
            prepare_run_dir(path, resume=resume, force=force, locked=True)
            lock.note_holder()
            if resume:
                rd.begin_segment("resume", [{"key": k, "old": old, "new": new} for k, old, new in changes])
                if changes:
                    note_changes_in_recipe(path, rd.history())
            else:
                dump_recipe(recipe, path / "recipe.yaml")
                rd.write_text(FINGERPRINT, _json(here))
                rd.begin_segment("start", [])
        except BaseException:
            lock.release()
            raise
        held.append(lock)
        return legacy, finished

    legacy, finished = dist.from_main(on_main)
    apply_settings(recipe, legacy)  # every rank runs with the values the folder was made with
    return OpenRun(path, held[0] if held else None, finished)
