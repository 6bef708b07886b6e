"""Run a sync-free step function through a CUDA graph: eager warm-up, one capture, then replays.

Small CIFAR convolutions are launch-bound on a big GPU; replaying a captured step removes the per-kernel launch
cost. The step must not read tensors back to the host, and everything it changes must be tensors it updates in
place (weights, optimizer state, running statistics, device-side meters). Inputs are copied into static buffers
before each replay; a call with other shapes (a last partial batch) runs eagerly. If capture fails, a RuntimeError
says why and how to turn capture off: a failed capture leaves the CUDA random generator unusable for the rest of
the process (seen on an H200 with torch 2.11), so carrying on eagerly would only fail later and less clearly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedStep"]


class GraphedStep:
    """`step(*tensors)` runs `fn(*tensors)`; on CUDA with `enabled`, through a captured graph after `warmup` calls."""

    def __init__(self, fn: Callable[..., None], *, enabled: bool, warmup: int = 3,
                 before_capture: Callable[[], None] | None = None, name: str = "the step",
                 setting: str = "cuda_graph"):
        self.fn, self.enabled, self.warmup, self.before_capture = fn, enabled, warmup, before_capture
        self.name, self.setting = name, setting
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] | None = None
        self.captured = False
        self.error: str | None = None  # why capture failed, if it did

    @staticmethod
    def _signature(tensors) -> tuple:
        return tuple((t.shape, t.dtype, t.stride(), t.device) for t in tensors)

    def __call__(self, *tensors: torch.Tensor) -> None:
        self.calls += 1
        if not self.enabled:
            self.fn(*tensors)
            return
        if self.graph is not None:
            if self._signature(tensors) == self._signature(self.static):
                for s, t in zip(self.static, tensors, strict=True):
                    s.copy_(t, non_blocking=True)
                self.graph.replay()
            else:
                self.fn(*tensors)
            return
        device = tensors[0].device
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.fn(*tensors)
            torch.cuda.current_stream(device).wait_stream(side)
            return
        self.static = [t.clone() for t in tensors]
        if self.before_capture is not None:
            self.before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.fn(*self.static)
        except Exception as err:  # noqa: BLE001 - report any capture failure with the way out
            self.error = f"{type(err).__name__}: {err}"
            raise RuntimeError(f"CUDA graph capture of {self.name} failed ({self.error}); run it eagerly with "
                               f"{self.setting}=false") from err
        self.graph, self.captured = graph, True
        self.graph.replay()  # capture records the work without running it; run it on this batch now
