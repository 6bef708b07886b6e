"""Which channels lose: a global ratio threshold on |α|, or the zeros left by an ℓ1 proximal step."""

from __future__ import annotations

import math

import torch

__all__ = ["select_ratio", "select_l1", "prox_l1_", "pruned_ratio"]


def _check_common(alphas: list[torch.Tensor], min_channels: int, round_to: int | None) -> None:
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be >= 1 or None, got {round_to}")
    if not alphas:
        raise ValueError("there are no gated channels to select from")


def _round_keep(keep: list[torch.Tensor], scores: list[torch.Tensor], round_to: int | None) -> list[torch.Tensor]:
    """Round each group's kept count up to a multiple of `round_to` by adding back its best-scored pruned channels."""
    if not round_to or round_to == 1:
        return keep
    out = []
    for k, s in zip(keep, scores):
        extra = min(k.numel(), math.ceil(int(k.sum()) / round_to) * round_to) - int(k.sum())
        k = k.clone()
        if extra > 0:
            pruned = torch.nonzero(~k).flatten()
            best = pruned[torch.argsort(s[pruned], descending=True, stable=True)[:extra]]
            k[best] = True
        out.append(k)
    return out


def select_ratio(alphas: list[torch.Tensor], ratio: float, *, min_channels: int = 1,
                 round_to: int | None = None) -> list[torch.Tensor]:
    """Keep masks pruning exactly `round(ratio · N)` of the N gated channels, smallest |α| first.

    One global threshold over all groups; ties are broken by group order, then channel order. A channel is spared
    when pruning it would leave its group with fewer than `min_channels`. `round_to` rounds each group's kept count
    up to a multiple (the achieved ratio is then at most `ratio`).
    """
    _check_common(alphas, min_channels, round_to)
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    scores = [a.detach().abs().float().cpu().flatten() for a in alphas]
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    target = round(ratio * total)
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    order = torch.argsort(flat, stable=True).tolist()
    kept_count = list(sizes)
    keep_flat = torch.ones(total, dtype=torch.bool)
    pruned = 0
    for idx in order:
        if pruned == target:
            break
        g = int(owner[idx])
        if kept_count[g] - 1 < min(min_channels, sizes[g]):
            continue
        keep_flat[idx] = False
        kept_count[g] -= 1
        pruned += 1
    if pruned < target:
        raise ValueError(f"ratio {ratio} asks to prune {target} of {total} channels but min_channels={min_channels} "
                         f"allows only {pruned}; lower the ratio or min_channels")
    keep = [keep_flat[o:o + n].clone() for o, n in zip(offsets, sizes)]
    return _round_keep(keep, scores, round_to)


def select_l1(alphas: list[torch.Tensor], *, min_channels: int = 1, round_to: int | None = None) -> list[torch.Tensor]:
    """Keep masks pruning the channels whose α is exactly 0 (left by the proximal ℓ1 step).

    A group with fewer than `min_channels` nonzero α keeps its largest |α| channels up to that count.
    """
    _check_common(alphas, min_channels, round_to)
    keep, scores = [], []
    for a in alphas:
        s = a.detach().abs().float().cpu().flatten()
        k = s != 0
        need = min(min_channels, s.numel())
        if int(k.sum()) < need:
            k[torch.argsort(s, descending=True, stable=True)[:need]] = True
        keep.append(k)
        scores.append(s)
    return _round_keep(keep, scores, round_to)


def prox_l1_(alphas: list[torch.Tensor], threshold: torch.Tensor | float) -> None:
    """Soft-threshold in place: α ← sign(α) · max(|α| − threshold, 0) (the proximal step of threshold·‖α‖₁)."""
    if not alphas:
        return
    with torch.no_grad():
        signs = torch._foreach_sign(alphas)
        mags = torch._foreach_abs(alphas)
        if isinstance(threshold, torch.Tensor):
            torch._foreach_add_(mags, threshold, alpha=-1)  # a 0-d device tensor: no host sync
        else:
            torch._foreach_sub_(mags, threshold)
        torch._foreach_clamp_min_(mags, 0.0)
        torch._foreach_mul_(mags, signs)
        torch._foreach_copy_(alphas, mags)


def pruned_ratio(keep: list[torch.Tensor]) -> float:
    """PRC: pruned gated channels / all gated channels."""
    total = sum(k.numel() for k in keep)
    return 1.0 - sum(int(k.sum()) for k in keep) / total if total else 0.0
