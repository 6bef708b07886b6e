"""Atomic checkpoints that load with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "load_checkpoint", "rng_state", "set_rng_state"]


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by `save_atomic` (tensors and plain data only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


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
