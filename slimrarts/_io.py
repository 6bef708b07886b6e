"""Atomic file writes: a temporary file in the target's folder, renamed over the target once complete.

Every file slimrarts writes goes through here (run folders, checkpoints, recipes, caches), so a crash or a full
disk leaves the old file or none, never a partial one. This module imports nothing of slimrarts (and not torch), so
any layer may use it. The temporary file is `.<name>.<random>.tmp` beside the target (`engine.rundir` recognises the
pattern as an interrupted write).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_file", "atomic_write", "is_temp_name"]

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
