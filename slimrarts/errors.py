"""The errors slimrarts raises for what a user gave it, and the command line's exit codes.

Every error about the user's input, files, environment or run folder is a `SlimrartsError`; each also derives from
the built-in type code that catches broadly expects (`ValueError`, `TypeError`, `FileNotFoundError`, ...). Anything
else that escapes is a bug in slimrarts (or in a library under it) and the command line shows its traceback.

Exit codes of `slimrarts` (README "When things go wrong" and `slimrarts --help` print this table):
"""

from __future__ import annotations

import errno
import os

__all__ = ["EXIT_CODES", "ConfigError", "CorruptFileError", "DataError", "DivergenceBase", "ExportMismatchError",
           "FileProblem", "InputError", "InputTypeError", "MissingExtraError", "MissingFileError", "PeerFailure",
           "ResumeMismatchError", "RunFolderError", "RunLockedError", "SlimrartsError", "describe_os_error"]

EXIT_CODES = {
    0: "done",
    1: "a bug in slimrarts or a library under it (with its traceback; please report it)",
    2: "a problem with the input, a file or the disk (one line names it)",
    3: "training diverged (the last good checkpoint stays; --resume with a smaller learning rate)",
    4: "the run folder is in use by another slimrarts process",
    5: "another process of a torchrun group failed (the run folder keeps the last complete epoch)",
    130: "interrupted (Ctrl-C or SIGTERM; continue with --resume)",
}
__doc__ += "".join(f"\n    {code:>3}  {what}" for code, what in EXIT_CODES.items()) + "\n"


class SlimrartsError(Exception):
    """A problem with what the user gave slimrarts (an argument, a recipe, data, a file, the run folder)."""

    exit_code = 2


class InputError(SlimrartsError, ValueError):
    """A value the user gave is not allowed; the message names it, its value and what is allowed."""


class InputTypeError(SlimrartsError, TypeError):
    """An argument of the wrong kind (a model that is not an nn.Module, a loader that is not one, ...)."""


class ConfigError(InputError):
    """A config value or key that is not allowed; the message names the key path."""


class DataError(InputError):
    """The data does not fit the task or the recipe (a batch's shape, labels, non-finite pixels, too few samples)."""


class FileProblem(InputError):
    """A file slimrarts reads (a recipe, a report, a width spec, a reference) is unreadable; the message names it."""


class CorruptFileError(FileProblem):
    """A file slimrarts wrote cannot be read back (truncated, empty, or not slimrarts' own); the message names the
    file and what to do."""


class MissingFileError(SlimrartsError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunFolderError(SlimrartsError, FileExistsError):
    """The run folder cannot be used as asked (it exists and is not being resumed, or it is a file)."""


class ResumeMismatchError(InputError):
    """`resume` was asked for a run folder made from another model, other data, other settings or versions."""


class RunLockedError(SlimrartsError):
    """Another live slimrarts process holds the run folder."""

    exit_code = 4


class MissingExtraError(SlimrartsError, ImportError):
    """An optional dependency is not installed; the message names the packages and the extra that installs them
    (`pip install "slimrarts[deploy]"`)."""


class ExportMismatchError(SlimrartsError, RuntimeError):
    """An exported file (ONNX, pt2) does not compute what the PyTorch model computes; the message names the format,
    the batch size, the max |Δ| and the tolerance. Nothing was written."""


class DivergenceBase(SlimrartsError, RuntimeError):
    """Base of `slimrarts.engine.epochs.DivergenceError` (a phase produced non-finite numbers)."""

    exit_code = 3


class PeerFailure(SlimrartsError, RuntimeError):
    """Base of `slimrarts.engine.dist.PeerError` (a collective of a torchrun group failed)."""

    exit_code = 5


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the path, the cause's errno name and its text (`/x/run: EROFS (Read-only file
    system)`), plus what usually helps."""
    path = err.filename if err.filename is not None else "?"
    if err.filename2 is not None:
        path = f"{path} → {err.filename2}"
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    text = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    hint = {errno.ENOSPC: "free some space (or point --out elsewhere), then continue with --resume",
            errno.EROFS: "write the run somewhere writable (--out)",
            errno.EACCES: "check the folder's permissions or point --out elsewhere",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "the path is a folder where a file was expected"}.get(err.errno)
    cause = f"{name} ({text})" if name else text
    return f"{path}: {cause}" + (f"; {hint}" if hint else "")
