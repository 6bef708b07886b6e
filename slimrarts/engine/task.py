"""The task a network learns, as every phase reads it: how a batch splits, the loss, and the metric.

Training (`fit`, `TrainStep`), evaluation (`evaluate`), the search's losses (`search.problem.NetProblem`) and the
pipeline (`prune()`) take a `Task` instead of assuming cross-entropy and top-1 accuracy. `Classification` is the
only one so far; a task for segmentation or detection implements the same methods.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import DataError

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

    def check(self, batch: Any, where: str) -> None:
        """Raise `DataError` naming the `where` loader when a batch cannot be read as this task's (the pre-flight
        look at each loader's first batch)."""
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

    def check(self, batch: Any, where: str) -> None:
        at = f"the {where} loader's first batch"
        if isinstance(batch, dict):
            raise DataError(f"{at} is a dict (keys {sorted(map(str, batch))}); the classification task reads "
                            "(images, labels) pairs: make the dataset return a tuple (or wrap the loader so it yields "
                            "them)")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{at} is a {type(batch).__name__}; the classification task reads (images, labels) pairs")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{at} holds a {type(x).__name__} and a {type(y).__name__}; give tensors (the "
                            "DataLoader's default collate makes them from a dataset of (tensor, int) pairs)")
        shape = tuple(y.shape)
        if y.is_floating_point() or y.dtype == torch.bool:
            kind = "one-hot or soft" if y.dim() == 2 else y.dtype
            raise DataError(f"{at} has {kind} labels ({y.dtype}, shape {shape}); the classification task needs "
                            "integer class indices of shape [batch]: " +
                            ("y.argmax(1)" if y.dim() == 2 else "y.long()") + " in the dataset or a collate_fn")
        if y.dtype not in (torch.int64, torch.uint8):
            raise DataError(f"{at} has {y.dtype} labels; cross-entropy reads int64 class indices: y.long() in the "
                            "dataset or a collate_fn")
        if y.dim() == 2:
            raise DataError(f"{at} has labels of shape {shape}, which look one-hot; give class indices of shape "
                            "[batch] (y.argmax(1))")
        if y.dim() != 1:
            raise DataError(f"{at} has labels of shape {shape}; the classification task needs shape [batch]")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise DataError(f"{at} has {x.shape[0] if x.dim() else 0} images but {y.shape[0]} labels")


CLASSIFICATION = Classification()
