"""Atomic checkpoints that load with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .._io import atomic_file
from ..errors import CorruptFileError

__all__ = ["CorruptFileError", "save_atomic", "load_checkpoint", "rng_state", "set_rng_state"]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it into place."""
    with atomic_file(path, fsync=True) as fh:
        torch.save(obj, fh)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, what: str = "checkpoint",
                    remedy: str = "delete it and run again", keys: tuple[str, ...] = ()) -> dict:
    """Load a file written by `save_atomic` (tensors and plain data only, `weights_only=True`).

    A file that cannot be read, is not a mapping or lacks one of `keys` raises `CorruptFileError` naming the file,
    `what` it is and the `remedy`.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read means the file is damaged or foreign
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CorruptFileError(f"{str(path)!r}: this {what} cannot be read ({type(err).__name__}; {size} bytes: "
                               f"truncated, empty, or not written by slimrarts). To go on: {remedy}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if not isinstance(obj, dict) or missing:
        raise CorruptFileError(f"{str(path)!r}: this {what} lacks {', '.join(missing) or 'its contents'} (not written "
                               f"by this version of slimrarts?). To go on: {remedy}")
    return obj


def rng_state() -> dict:
    """The global torch RNG states (CPU and, if initialised, CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states from `rng_state()`."""
    torch.set_rng_state(state["cpu"].cpu())  # a checkpoint loaded with map_location=cuda moves these too
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
