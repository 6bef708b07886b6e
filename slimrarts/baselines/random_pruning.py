"""Random pruning: train on the whole set, then drop random channels — at a global ratio, or at the same per-group
counts as a reference run (the RARTS paper's "random pruning", Table 6)."""

from __future__ import annotations

from pathlib import Path

import torch

from .._io import read_json
from ..engine.fit import fit
from ..engine.task import CLASSIFICATION
from ..errors import InputError, MissingFileError
from .base import BaselineResult, register_baseline, search_like

__all__ = ["random_keep", "random_pruning", "read_reference", "reference_counts"]


def random_keep(sizes: list[int], counts: list[int], seed: int) -> list[torch.Tensor]:
    """Keep masks with exactly `counts[i]` random channels kept in group i."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, k in zip(sizes, counts, strict=True):
        if not 1 <= k <= n:
            raise InputError(f"a group of {n} channels cannot keep {k}")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:k]] = True
        out.append(mask)
    return out


def _kept_count(group: dict) -> int:
    """The number of channels a width spec's group keeps; its `kept` must be a list of channel indices."""
    kept = group["kept"]
    if not isinstance(kept, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in kept):
        raise TypeError(f"group {group.get('name')!r}: 'kept' must be a list of channel indices, got "
                        f"{type(kept).__name__} {str(kept)[:40]!r}")
    return len(kept)


def read_reference(path: str) -> tuple[Path, dict[str, int]]:
    """The width spec file of the reference run `path` (a run folder or its width_spec.json) and its kept count per
    group name; a missing, unreadable or malformed file fails naming it (checked before any run folder is made)."""
    p = Path(path)
    if p.is_dir():
        p = p / "width_spec.json"
    if not p.is_file():
        raise MissingFileError(f"prune.reference: {str(p)!r} does not exist (give a run folder or its "
                               "width_spec.json)")
    try:
        spec = read_json(p, what="prune.reference: ")
        kept = {g["name"]: _kept_count(g) for g in spec["groups"]}
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"prune.reference: {str(p)!r} is not a readable width spec ({type(err).__name__}: {err}); "
                         "point it at the run folder (or width_spec.json) of a finished run") from None
    return p, kept


def reference_counts(path: str, gates) -> list[int]:
    """The per-group kept counts of the reference run `path` (a run folder or its width_spec.json), in the order of
    `gates.groups`; errors name a missing file or group, or a count the group cannot hold."""
    p, kept = read_reference(path)
    missing = [g.name for g in gates.groups if g.name not in kept]
    if missing:
        raise InputError(f"prune.reference {str(p)!r} has no group {missing[0]!r}: was it a run of the same model "
                         "and scope?")
    for g in gates.groups:  # a count the group cannot hold (another model's widths) or cannot be cut to exactly
        n, channels = kept[g.name], g.size
        if not 1 <= n <= channels or n % g.repeat:
            raise InputError(f"prune.reference {str(p)!r} keeps {n} channels of group {g.name!r}, which has "
                             f"{channels}{f' in blocks of {g.repeat}' if g.repeat > 1 else ''}: was it a run of the "
                             "same model and scope?")
    return [kept[g.name] for g in gates.groups]


def random_pruning(model, gates, loaders, recipe, *, device, run_dir=None, resume=False,
                   progress=True, task=CLASSIFICATION) -> BaselineResult:
    """Plain training (search section) on the whole set; random scores, or random masks at reference counts."""
    for a in gates.alphas:
        a.requires_grad_(False)
    result = fit(model, loaders.train, None, cfg=search_like(recipe), device=device, run_dir=run_dir, phase="search",
                 resume=resume, progress=progress, task=task)
    seed = recipe.seed + 7919
    if recipe.prune.reference:
        counts = reference_counts(recipe.prune.reference, gates)  # channels; an α entry holds `repeat` of them
        keep = random_keep([g.num_alphas for g in gates.groups],
                           [c // g.repeat for c, g in zip(counts, gates.groups, strict=True)], seed)
        return BaselineResult(scores=None, keep=keep, fit=result,
                              note=f"random channels at the per-group counts of {recipe.prune.reference}")
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(grp.num_alphas, generator=g) for grp in gates.groups]
    return BaselineResult(scores=scores, keep=None, fit=result, note="random channels at a global ratio")


register_baseline("random", source="random pruning (RARTS paper, Table 6)",
                  description="train on the whole set; keep random channels at a global ratio or at a reference "
                              "run's per-group counts", reads_reference=True)(random_pruning)
