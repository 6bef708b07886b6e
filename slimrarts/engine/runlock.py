"""One process per run folder: an OS file lock held for the whole run.

`lock_run_dir(path)` takes `fcntl.flock` on `<run folder>/.slimrarts-lock` through a file descriptor this process
keeps open until `RunLock.release()`, so the kernel frees it when the process ends in any way, `kill -9` included.
The file itself is only a place to lock and a note of the holder (pid, host, since) for the message another process
gets; a file left by a process that has died is simply locked again and its note overwritten, since what decides is
the flock, never the file's existence. The file is never deleted (a process holding a deleted file's lock would
exclude nobody).

Under torchrun rank 0 alone takes it (the callers run it through `dist.from_main`). Processes forked while a lock is
held (DataLoader workers) close their copy of the descriptor at once, so a killed run does not stay locked by
workers that outlive it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import time
from pathlib import Path

from ..errors import RunLockedError

try:
    import fcntl
except ImportError:  # not a POSIX system: run folders are not locked there
    fcntl = None

__all__ = ["LOCK_FILE", "RunLock", "check_unlocked", "lock_run_dir"]

LOCK_FILE = ".slimrarts-lock"
_WAIT_S = 0.5  # a probe (`check_unlocked`) holds a shared lock for microseconds; a taker retries this long past it
_HELD: set[int] = set()  # descriptors of the locks this process holds (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)  # the child's copy only: the parent's lock stays
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The lock of one run folder held by this process; `release()` (or leaving a `with` block) frees it."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self._fd, self._pid = folder, fd, os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def note_holder(self) -> None:
        """Write this process's pid, host and the time into the lock file (for the message others get)."""
        if self._fd is None:
            return
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": _dt.datetime.now().isoformat(timespec="seconds")}) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, note.encode(), 0)

    def release(self) -> None:
        """Free the lock (for forked children too) and close the descriptor; a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:  # a forked child closed its copy at the fork
            return
        _HELD.discard(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # an abandoned lock (a run object dropped unfinished) frees its folder
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the process's end frees it anyway
            pass

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, held={self.held})"


def _holder(file: Path) -> dict | None:
    try:
        note = json.loads(file.read_text() or "null")
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _refusal(folder: Path) -> RunLockedError:
    note = _holder(folder / LOCK_FILE)
    pid = note.get("pid") if note else None
    host = note.get("host", "?") if note else "?"
    who = "another process"
    if isinstance(pid, int):
        here = host == socket.gethostname()
        if here and pid == os.getpid():
            who = (f"this process ({pid}; a run started here has not finished: call finish(run) or run.close() "
                   "on it)")
        elif here and not _alive(pid):
            who = "another process, which is just starting"  # the note still names the previous holder
        else:
            who = f"process {pid} on host {host}"
        if note.get("since"):
            who += f" since {note['since']}"
    return RunLockedError(f"run folder {str(folder)!r} is in use by {who}; wait for it or use another --out")


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def check_unlocked(path: str | os.PathLike) -> None:
    """Raise `RunLockedError` (naming the holder) if a live process holds the run folder `path`; change nothing."""
    file = Path(path) / LOCK_FILE
    if fcntl is None or not file.is_file():
        return
    fd = os.open(file, os.O_RDONLY)
    try:
        if not _try_flock(fd, fcntl.LOCK_SH):
            raise _refusal(Path(path))
    finally:
        os.close(fd)  # frees the shared lock of the probe


def lock_run_dir(path: str | os.PathLike) -> RunLock:
    """Take the lock of run folder `path` (created if missing) for this process, or raise `RunLockedError` naming
    the process that holds it. The holder's note is written by `RunLock.note_holder()` once the run's checks have
    passed, so a refused run leaves the lock file as it was."""
    folder = Path(path)
    if fcntl is None:
        return RunLock(folder, None)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _WAIT_S
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() >= deadline:
                raise _refusal(folder)
            time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    _HELD.add(fd)
    return RunLock(folder, fd)
