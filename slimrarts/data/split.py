"""Deterministic index splits of a labelled set: the two search halves D_t / D_v, and k samples per class."""

from __future__ import annotations

import torch

from ..errors import InputError, InputTypeError

__all__ = ["limit_per_class", "split_halves"]


def split_halves(labels: torch.Tensor, seed: int = 0, *, stratified: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the indices 0..N-1 into two disjoint random halves (D_t, D_v) that cover them all, each sorted.

    Stratified: every class is halved; classes with an odd count give their extra sample alternately to the first
    and the second half, so the halves differ by at most 1 per class and at most 1 in all. Otherwise the first
    half has the extra sample of an odd N. Depends only on `labels` and `seed`.
    """
    labels = _check_labels(labels, "split_halves")
    _check_seed(seed, "split_halves")
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if stratified:
        grouped, rank, counts = _group_by_class(labels, order)
        odd = counts % 2 == 1
        extra = odd & (torch.cumsum(odd.long(), 0) % 2 == 1)  # first, third, ... odd class: extra to the first half
        first = grouped[rank < (counts // 2 + extra.long()).repeat_interleave(counts)]
    else:
        first = order[: (n + 1) // 2]
    in_first = torch.zeros(n, dtype=torch.bool)
    in_first[first] = True
    return in_first.nonzero().squeeze(1), (~in_first).nonzero().squeeze(1)


def limit_per_class(labels: torch.Tensor, k: int, seed: int | None = None) -> torch.Tensor:
    """Sorted indices of the first `k` samples of each class (a random `k`, drawn from `seed`, when given).

    A class with fewer than `k` samples keeps all of them.
    """
    labels = _check_labels(labels, "limit_per_class")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"limit_per_class: k must be an int >= 1, got {k!r}")
    if seed is None:
        order = torch.arange(len(labels))
    else:
        _check_seed(seed, "limit_per_class")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    grouped, rank, _ = _group_by_class(labels, order)
    return torch.sort(grouped[rank < k]).values


def _group_by_class(labels: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`order` regrouped class by class (keeping its order within a class), each entry's rank in its class, and the
    sample count of each class (in sorted class order)."""
    grouped = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.unique(labels, return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts.repeat_interleave(counts)
    return grouped, rank, counts


def _check_labels(labels: torch.Tensor, fn: str) -> torch.Tensor:
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point
            or labels.dtype.is_complex or labels.dtype == torch.bool):
        shown = (f"a {labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                 else type(labels).__name__)
        raise InputTypeError(f"{fn}: labels must be a 1-D integer tensor, got {shown}")
    return labels.to("cpu", torch.int64)


def _check_seed(seed: int, fn: str) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"{fn}: seed must be an int >= 0, got {seed!r}")
