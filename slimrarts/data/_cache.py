"""Decoded-image caches: one torch file per source, found by a key hash, checked by the full key, written atomically."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from .._io import atomic_file

__all__ = ["cache_file", "read_cache", "write_cache"]


def cache_file(cache_dir: Path, prefix: str, key: str) -> Path:
    """The cache file of `key` in `cache_dir`: `<prefix>-<24 hex digits of the key's sha256>.pt`."""
    return cache_dir / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def read_cache(file: Path, key: str) -> dict | None:
    """The blob cached in `file` when it is there, readable and written for `key`; otherwise None.

    An unreadable file is ignored with a warning (it is rebuilt, never fatal).
    """
    if not file.is_file():
        return None
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        warnings.warn(f"ignoring the unreadable data cache {file}: {type(e).__name__}: {e}", stacklevel=4)
        return None
    return blob if isinstance(blob, dict) and blob.get("key") == key else None


def write_cache(blob: dict, file: Path) -> None:
    """Write `blob` to `file` through a temporary file and a rename; a failure only warns."""
    try:
        with atomic_file(file) as f:
            torch.save(blob, f)
    except OSError as e:
        warnings.warn(f"could not write the data cache {file}: {e}", stacklevel=4)
