"""The supervised training step: forward, backward, optimizer step, metrics kept on the device.

The step never reads a tensor back to the host; loss and accuracy accumulate in device tensors read once per
epoch (or every `log_every` steps by the progress display). On CUDA it can be captured in a CUDA graph
(`GraphedStep`): eager warm-up calls, one capture, then replays on static input buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from . import dist
from .graph import GraphedStep
from .task import CLASSIFICATION, Task

__all__ = ["TrainStep", "autocast", "batches_on"]


def autocast(device: torch.device, amp: str):
    """bf16 autocast when `amp == 'bf16'`, a no-op context otherwise.

    The cast-weight cache is off: it does not survive CUDA-graph capture, and weights change every step anyway.
    """
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def batches_on(loader, device: torch.device, channels_last: bool = False, task: Task = CLASSIFICATION):
    """Yield `(x, y)` (as `task.split` reads a batch) from any loader on `device`; the library's loader already is,
    a DataLoader is moved."""
    for batch in loader:
        x, y = task.to(*task.split(batch), device)
        if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


class TrainStep:
    """`step(x, y)` trains `model` on one batch; `read()` returns and resets the epoch's running metrics.

    `cuda_graph` takes effect on CUDA devices only (`captured` tells whether the step replays a graph).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp: str = "none",
        after_backward: Callable[[], None] | None = None,
        loss_fn: Callable | None = None,
        cuda_graph: bool = False,
        warmup: int = 3,
        task: Task = CLASSIFICATION,
    ):
        self.model, self.optimizer, self.device, self.amp, self.task = model, optimizer, device, amp, task
        self.after_backward, self.loss_fn = after_backward, loss_fn or task.loss
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self._loss_sum = torch.zeros((), device=device)
        self._correct = torch.zeros((), device=device)  # the running metric's numerator and denominator
        self._total = torch.zeros((), device=device)
        self._count = 0
        self._graphed = GraphedStep(self._body, enabled=cuda_graph and device.type == "cuda", warmup=warmup,
                                    before_capture=lambda: optimizer.zero_grad(set_to_none=True),
                                    name="the train step", setting="train.cuda_graph (or finetune.cuda_graph)")

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.amp):
            out = self.model(*self.task.train_args(x, y))
        loss = self.loss_fn(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        with torch.no_grad():
            self._loss_sum.add_(loss.detach() * self.task.count(y))
            running = self.task.running(out, y)
            if running is not None:
                self._correct.add_(running[0])
                self._total.add_(running[1])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._count += self.task.count(y)
        self._graphed(x, y)

    @property
    def captured(self) -> bool:
        """Whether the step now replays a CUDA graph."""
        return self._graphed.captured

    @property
    def capture_error(self) -> str | None:
        """Why CUDA-graph capture failed, if it was asked for and did."""
        return self._graphed.error

    def peek(self) -> tuple[float, float]:
        """Running mean loss and metric (`task.train_metric`; nan without one) of the epoch so far (a host sync;
        call between steps, not in one)."""
        n = max(1, self._count)
        total = self._total.item()
        return self._loss_sum.item() / n, self._correct.item() / total if total else float("nan")

    def read(self) -> dict:
        """Mean loss, accuracy and sample count since the last `read`, then reset (one host sync); in a process
        group, over every rank's samples (one all-reduce)."""
        if dist.active():
            return self._read_all()
        loss, acc = self.peek()
        out = {"loss": loss, "acc": acc, "n": self._count}
        self._reset()
        return out

    def _reset(self) -> None:
        self._loss_sum.zero_()
        self._correct.zero_()
        self._total.zero_()
        self._count = 0

    def _read_all(self) -> dict:
        sums = torch.stack([self._loss_sum.double(), self._correct.double(), self._total.double(),
                            torch.tensor(float(self._count), device=self.device, dtype=torch.float64)])
        dist.all_reduce_([sums], "sum")
        loss_sum, correct, total, n = sums.tolist()
        self._reset()
        return {"loss": loss_sum / max(1.0, n), "acc": correct / total if total else float("nan"), "n": int(n)}
