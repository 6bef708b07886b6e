"""Which device a run uses: the one place a device name is resolved."""

from __future__ import annotations

import torch

from ..errors import InputError
from . import dist

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else MPS, else CPU; a named device must exist here.

    In a process group (torchrun), `cuda` and `auto` mean this process's GPU, `cuda:LOCAL_RANK`.
    """
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if torch.cuda.is_available():
            return _this_gpu(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return _this_gpu(device)


def _this_gpu(device: torch.device) -> torch.device:
    """`cuda` as this process's current GPU (set from LOCAL_RANK by `dist.init`) when in a process group."""
    if device.type == "cuda" and device.index is None and dist.active():
        return torch.device("cuda", torch.cuda.current_device())
    return device
