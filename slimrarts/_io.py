"""Atomic file writes: a temporary file in the target's folder, renamed over the target once complete.

Every file slimrarts writes goes through here (run folders, checkpoints, recipes, caches), so a crash or a full
disk leaves the old file or none, never a partial one. Reading them back (`read_json`, `read_jsonl`) fails naming
the file. This module imports only `slimrarts.errors` (and not torch), so any layer may use it. The temporary file
is `.<name>.<random>.tmp` beside the target (`engine.rundir` recognises the pattern as an interrupted write).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import FileProblem, MissingFileError

__all__ = ["atomic_file", "atomic_write", "is_temp_name", "read_json", "read_jsonl"]

FILE_MODE = 0o644  # mkstemp makes files 0600; what we write is as readable as any other file


def is_temp_name(name: str) -> bool:
    """Whether `name` is the file name of an interrupted atomic write."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[IO[bytes]]:
    """A temporary binary file beside `path`, open for writing (e.g. for `torch.save`); on a clean exit it replaces
    `path` (after an fsync with `fsync=True`), on an exception it is removed and `path` keeps its former content.
    The folder is created if missing."""
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):  # a file where a folder is needed: say so (not EEXIST)
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if err.filename is None and err.errno is not None:  # e.g. ENOSPC inside torch.save: name the file
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; see `atomic_file`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path, fsync=fsync) as fh:
        fh.write(data)


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise MissingFileError(f"{what}{path}: no such file")
    if path.is_dir():
        raise FileProblem(f"{what}{path} is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FileProblem(f"{what}{path} is not a text file (byte {err.start} is not UTF-8): is it the right "
                          "file?") from None


def read_json(path: str | os.PathLike, *, what: str = "") -> Any:
    """The JSON document in `path`. A missing, empty, binary or damaged file raises a `slimrarts.errors` error that
    names it (and `what`, e.g. "prune.reference: ", the setting or file role it was read for)."""
    path = Path(path)
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}: {err.msg}"
        state = "is empty" if not text.strip() else f"is not valid JSON ({where})"
        raise FileProblem(f"{what}{path} {state}; it may be truncated or not the file meant") from None


def read_jsonl(path: str | os.PathLike, *, what: str = "") -> list[Any]:
    """The JSON lines of `path` (blank lines skipped); a damaged line raises an error naming the file and line."""
    path = Path(path)
    out = []
    for i, line in enumerate(_read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FileProblem(f"{what}{path}: line {i} is not valid JSON ({err.msg}); the file is damaged (remove "
                              "that line, or the file, to continue)") from None
    return out
