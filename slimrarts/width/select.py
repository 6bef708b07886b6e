"""Which channels lose: a global ratio threshold on |α|, or the zeros left by an ℓ1 proximal step."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

__all__ = ["select_ratio", "select_l1", "pruned_ratio", "prunable_channels"]


def _check_common(alphas: list[torch.Tensor], min_channels: int, round_to: int | None,
                  repeats: list[int] | None) -> list[int]:
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be >= 1 or None, got {round_to}")
    if not alphas:
        raise ValueError("there are no gated channels to select from")
    return check_repeats(len(alphas), repeats)


def check_repeats(n: int, repeats: Sequence[int] | None, name: str = "repeats") -> list[int]:
    """Channels per α entry of each of `n` groups: `repeats` as a list of ints, checked (None: 1 each).

    `name` is the argument's name in the error (`select_budget` calls it `repeat`)."""
    if repeats is None:
        return [1] * n
    out = [_as_int(r) for r in repeats]
    if len(out) != n or any(r is None or r < 1 for r in out):
        raise ValueError(f"{name} must hold one int >= 1 per group ({n} groups), got {repeats!r}")
    return out


def _as_int(value) -> int | None:
    """An int (or an integer numpy/torch scalar) as int; anything else (bools, floats) None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _min_entries(n: int, repeat: int, min_channels: int) -> int:
    """α entries a group must keep so that at least `min_channels` channels (or all it has) survive."""
    return math.ceil(min(min_channels, n * repeat) / repeat)


def _round_keep(keep: list[torch.Tensor], scores: list[torch.Tensor], round_to: int | None,
                repeats: list[int]) -> list[torch.Tensor]:
    """Round each group's kept channel count up to a multiple of `round_to` by adding back its best-scored pruned
    entries (an entry holds `repeat` channels; a group can't exceed its size)."""
    if not round_to or round_to == 1:
        return keep
    out = []
    for k, s, r in zip(keep, scores, repeats, strict=True):
        step = round_to // math.gcd(round_to, r)  # entries per multiple of round_to channels
        extra = min(k.numel(), math.ceil(int(k.sum()) / step) * step) - int(k.sum())
        k = k.clone()
        if extra > 0:
            pruned = torch.nonzero(~k).flatten()
            best = pruned[torch.argsort(s[pruned], descending=True, stable=True)[:extra]]
            k[best] = True
        out.append(k)
    return out


def _floors(sizes: list[int], repeats: list[int], min_channels: int, min_kept: list[int] | None) -> list[int]:
    """α entries each group must keep: `min_channels` channels, and at least `min_kept[i]` entries (from
    `prune.exclude` / `prune.max_pruned`, see `width.budget.min_kept`)."""
    floor = [_min_entries(n, r, min_channels) for n, r in zip(sizes, repeats, strict=True)]
    if min_kept is None:
        return floor
    if len(min_kept) != len(sizes):
        raise ValueError(f"min_kept must hold one count per group ({len(sizes)} groups), got {len(min_kept)}")
    return [min(n, max(f, int(m))) for n, f, m in zip(sizes, floor, min_kept, strict=True)]


def select_ratio(alphas: list[torch.Tensor], ratio: float, *, min_channels: int = 1, round_to: int | None = None,
                 repeats: list[int] | None = None, min_kept: list[int] | None = None) -> list[torch.Tensor]:
    """Keep masks (one bool per α entry) pruning `round(ratio · N)` of the N gated channels, smallest |α| first.

    One global threshold over all groups; ties are broken by group order, then channel order. An entry is spared
    when pruning it would leave its group with fewer than `min_channels` channels. `round_to` rounds each group's
    kept channel count up to a multiple (the achieved ratio is then at most `ratio`).

    `repeats[i]` is the number of channels each α entry of group i gates (`Gates.repeats`, >1 for grouped convs;
    default 1). Channel counts, `min_channels` and `round_to` are in channels; with repeats the threshold stops where
    the pruned channel count is closest to the target (ties: fewer pruned), so the ratio is met to within half an
    entry; with all repeats 1 it is exact. `min_kept[i]` α entries of group i are never pruned (excluded layers,
    per-layer caps).
    """
    repeats = _check_common(alphas, min_channels, round_to, repeats)
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    scores = [a.detach().abs().float().cpu().flatten() for a in alphas]
    sizes = [s.numel() for s in scores]
    total = sum(n * r for n, r in zip(sizes, repeats, strict=True))
    target = round(ratio * total)
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)]).tolist()
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    floor = _floors(sizes, repeats, min_channels, min_kept)
    kept_count = list(sizes)
    walk, pruned = [], 0  # entries a falling threshold prunes, in order, and the channels pruned so far
    for idx in torch.argsort(flat, stable=True).tolist():
        if pruned >= target:
            break
        g = owner[idx]
        if kept_count[g] - 1 < floor[g]:
            continue
        kept_count[g] -= 1
        pruned += repeats[g]
        walk.append((idx, pruned))
    if pruned < target - max(repeats) // 2:
        raise ValueError(f"ratio {ratio} asks to prune {target} of {total} channels but min_channels={min_channels} "
                         f"(and prune.exclude / prune.max_pruned) allow only {pruned}; lower the ratio or those limits")
    stop = len(walk)
    if walk and walk[-1][1] > target:  # overshot with the last entry: drop it if that gets closer (or as close)
        before = walk[-2][1] if len(walk) > 1 else 0
        if target - before <= walk[-1][1] - target:
            stop -= 1
    keep_flat = torch.ones(len(owner), dtype=torch.bool)
    for idx, _ in walk[:stop]:
        keep_flat[idx] = False
    keep = [keep_flat[o:o + n].clone() for o, n in zip(offsets, sizes, strict=True)]
    return _round_keep(keep, scores, round_to, repeats)


def select_l1(alphas: list[torch.Tensor], *, min_channels: int = 1, round_to: int | None = None,
              repeats: list[int] | None = None, min_kept: list[int] | None = None) -> list[torch.Tensor]:
    """Keep masks pruning the entries whose α is exactly 0 (left by the proximal ℓ1 step).

    A group with fewer than `min_channels` channels (or `min_kept[i]` entries) left keeps its largest |α| entries
    up to that count; `repeats` as in `select_ratio`.
    """
    repeats = _check_common(alphas, min_channels, round_to, repeats)
    floors = _floors([a.numel() for a in alphas], repeats, min_channels, min_kept)
    keep, scores = [], []
    for a, need in zip(alphas, floors, strict=True):
        s = a.detach().abs().float().cpu().flatten()
        k = s != 0
        if int(k.sum()) < need:
            k[torch.argsort(s, descending=True, stable=True)[:need]] = True
        keep.append(k)
        scores.append(s)
    return _round_keep(keep, scores, round_to, repeats)


def pruned_ratio(keep: list[torch.Tensor], repeats: list[int] | None = None) -> float:
    """PRC: pruned gated channels / all gated channels (an entry of group i counts `repeats[i]` channels)."""
    repeats = check_repeats(len(keep), repeats)
    total = sum(k.numel() * r for k, r in zip(keep, repeats, strict=True))
    return 1.0 - sum(int(k.sum()) * r for k, r in zip(keep, repeats, strict=True)) / total if total else 0.0


def prunable_channels(groups, min_channels: int = 1) -> int:
    """Channels `select_ratio` may prune at most from `groups` (ChannelGroups) while keeping `min_channels` each."""
    return sum(g.size - g.repeat * _min_entries(g.size // g.repeat, g.repeat, min_channels) for g in groups)
