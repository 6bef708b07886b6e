"""The supervised training step: forward, backward, optimizer step, metrics kept on the device.

The step never reads a tensor back to the host; loss and accuracy accumulate in device tensors read once per
epoch (or every `log_every` steps by the progress display). On CUDA it can be captured in a CUDA graph: the first
`warmup` calls run eagerly on a side stream, then one call is captured and later calls replay it after copying the
batch into static buffers. Batches of another shape (a last partial batch) run eagerly.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["TrainStep", "autocast", "batches_on"]


def autocast(device: torch.device, amp: str):
    """bf16 autocast when `amp == 'bf16'`, a no-op context otherwise."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batches_on(loader, device: torch.device, channels_last: bool = False):
    """Yield `(x, y)` from any loader on `device`; the library's loader already is, a DataLoader is moved."""
    for batch in loader:
        x, y = batch[0], batch[1]
        if x.device != device:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


class TrainStep:
    """`step(x, y)` trains `model` on one batch; `read()` returns and resets the epoch's running metrics."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp: str = "none",
        after_backward: Callable[[], None] | None = None,
        loss_fn: Callable = F.cross_entropy,
        cuda_graph: bool = False,
        warmup: int = 3,
    ):
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.after_backward, self.loss_fn = after_backward, loss_fn
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self._loss_sum = torch.zeros((), device=device)
        self._correct = torch.zeros((), device=device, dtype=torch.long)
        self._count = 0
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor] | None = None

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.amp):
            out = self.model(x)
        loss = self.loss_fn(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        with torch.no_grad():
            self._loss_sum.add_(loss.detach() * y.shape[0])
            self._correct.add_((out.argmax(1) == y).sum())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._count += y.shape[0]
        self._calls += 1
        if not self.cuda_graph:
            return self._body(x, y)
        if self._graph is not None:
            sx, sy = self._static
            if sx.shape == x.shape and sx.stride() == x.stride():
                sx.copy_(x, non_blocking=True)
                sy.copy_(y, non_blocking=True)
                self._graph.replay()
                return None
            return self._body(x, y)
        if self._calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._body(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return None
        self._static = (x.clone(), y.clone())
        self._graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self._graph):
            self._body(*self._static)
        self._graph.replay()  # capture does not run the work; this runs the step on this batch
        return None

    def peek(self) -> tuple[float, float]:
        """Running mean loss and accuracy of the epoch so far (a host sync; call between steps, not in one)."""
        n = max(1, self._count)
        return self._loss_sum.item() / n, self._correct.item() / n

    def read(self) -> dict:
        """Mean loss, accuracy and sample count since the last `read`, then reset (one host sync)."""
        loss, acc = self.peek()
        out = {"loss": loss, "acc": acc, "n": self._count}
        self._loss_sum.zero_()
        self._correct.zero_()
        self._count = 0
        return out
