"""An in-memory labelled image set: uint8 images, int64 labels and class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError, InputTypeError

__all__ = ["ImageSet"]


@dataclass(frozen=True, eq=False, repr=False)
class ImageSet:
    """Images as one uint8 tensor [N, 3, H, W] on the CPU, their labels [N] and the class names.

    `source` says where the images came from (a path and a kind), for reports; it may be empty.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise InputTypeError(f"ImageSet.images must be a uint8 tensor [N, 3, H, W], got {_describe(images)}")
        if images.shape[1] != 3:
            raise InputError(f"ImageSet.images must have 3 channels [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.device.type != "cpu" or not images.is_contiguous():
            raise InputError(f"ImageSet.images must be a contiguous CPU tensor, got one on {images.device} "
                             f"(contiguous={images.is_contiguous()})")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise InputTypeError(f"ImageSet.labels must be an int64 tensor [N], got {_describe(labels)}")
        if labels.device.type != "cpu" or len(labels) != len(images):
            raise InputError(f"ImageSet.labels must be a CPU tensor with one label per image ({len(images)}), "
                             f"got {len(labels)} on {labels.device}")
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise InputTypeError(f"ImageSet.classes must be a sequence of class names (str), got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise InputError(f"ImageSet.classes must be non-empty and unique, got {self.classes!r}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise InputError(f"ImageSet.labels must lie in [0, {len(self.classes)}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        where = f", source={self.source!r}" if self.source else ""
        return f"ImageSet(n={len(self)}, shape={shape}, num_classes={self.num_classes}{where})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageSet:
        """The images at `indices` (integers in [0, N), in the given order), as a new ImageSet."""
        idx = _as_index(indices, len(self), "indices")
        return ImageSet(self.images.index_select(0, idx), self.labels.index_select(0, idx), self.classes, self.source)


def _as_index(indices: torch.Tensor | Sequence[int], n: int, what: str) -> torch.Tensor:
    """`indices` as a 1-D int64 CPU tensor checked to lie in [0, n)."""
    if isinstance(indices, torch.Tensor):
        idx = indices
    else:
        seq = list(indices)
        idx = torch.as_tensor(seq) if seq else torch.empty(0, dtype=torch.int64)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool or idx.dim() != 1:
        raise InputTypeError(f"{what} must be a 1-D integer tensor or a sequence of ints, got {_describe(idx)}")
    idx = idx.to("cpu", torch.int64)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise InputError(f"{what} must lie in [0, {n}), got values in [{int(idx.min())}, {int(idx.max())}]")
    return idx


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
