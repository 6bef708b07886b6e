"""Timing on a device: what the device is called, where measured latencies are cached.

Imports nothing of slimrarts, so the metrics, the width latency model and the cell search's cost tables share it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["device_name", "latency_cache_dir"]


def latency_cache_dir() -> Path:
    """$SLIMRARTS_CACHE/latency, else $XDG_CACHE_HOME/slimrarts/latency, else ~/.cache/slimrarts/latency."""
    if os.environ.get("SLIMRARTS_CACHE"):
        return Path(os.environ["SLIMRARTS_CACHE"]).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "slimrarts" / "latency"


def device_name(device: str | torch.device, *, detail: bool = False) -> str:
    """The device's name: the GPU's (`NVIDIA H100 80GB HBM3`), else the processor's (`x86_64`).

    With `detail`, everything a measured time depends on, for cache keys: `cuda:<name>:sm<major><minor>` or
    `<type>:<processor>:<n>threads`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if not detail:
            return name
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{name}:sm{major}{minor}"
    name = platform.processor() or platform.machine()
    return f"{device.type}:{name}:{torch.get_num_threads()}threads" if detail else name
