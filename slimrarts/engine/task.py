"""The task a network learns, as every phase reads it: how a batch splits, the loss, and the metric.

Training (`fit`, `TrainStep`), evaluation (`evaluate`), the search's losses (`search.problem.NetProblem`) and the
pipeline (`prune()`) take a `Task` instead of assuming cross-entropy and top-1 accuracy. `Classification` is the
only one so far; a task for segmentation or detection implements the same four methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["CLASSIFICATION", "Classification", "Task"]


class Task(Protocol):
    """What the phases need to know about the learning problem."""

    name: str
    metric: str  # the key of the metric in reports and metrics lines ("acc")

    def split(self, batch: Any) -> tuple[Any, Any]:
        """`(inputs, target)` of one batch as a loader yields it."""
        ...

    def loss(self, out: Any, target: Any, reduction: str = "mean") -> torch.Tensor:
        """The training loss of the model's output (fp32)."""
        ...

    def hits(self, out: Any, target: Any) -> torch.Tensor:
        """The metric's numerator on this batch, a 0-d device tensor summed over batches (no host sync)."""
        ...

    def count(self, target: Any) -> int:
        """The metric's denominator on this batch (samples)."""
        ...


class Classification:
    """Cross-entropy and top-1 accuracy over `[batch, classes]` logits (of a tuple output, the first element: the
    main head of a model with auxiliary heads)."""

    name = "classification"
    metric = "acc"

    @staticmethod
    def logits(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0], batch[1]

    def loss(self, out: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.logits(out).float(), target, reduction=reduction)

    def hits(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        return (self.logits(out).argmax(1) == target).sum()

    def count(self, target: torch.Tensor) -> int:
        return target.shape[0]


CLASSIFICATION = Classification()
