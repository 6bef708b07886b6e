"""Which channels lose: a global ratio threshold on |α|, the zeros left by an ℓ1 proximal step, or a budget; and
the selection stage that applies them (`Selection`): from channel scores and the recipe's `prune` section to keep
masks.

`Selection.prepare(gates, recipe, ...)` runs before any training: it builds the cost model (exact MACs/params of
the cut network) and, for a latency budget, the measured latency model; parses the budget and fails when it is
below what the gated scopes can reach (naming that floor); and turns `prune.exclude` / `prune.max_pruned` into
per-group minimum kept counts. It then serves the search (the cost term μ·Cost(α)/Cost_dense and, in ℓ1 mode, the
budget as a stopping rule) and the cut (`select`, `tighten` for latency), and says what it did for the report.

Modes (exactly one is in force): `ratio` prunes `prune.ratio` of the gated channels (a channel count); `budget`
keeps at most `prune.budget.target` of the dense model's MACs, parameters or latency (what REMAINS); `l1` prunes
the channels whose α the proximal ℓ1 step drove to zero, and a budget, if given, ends the search at the first
epoch whose non-zero channels fit it and cuts further by score per cost if the zeros alone do not reach it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from ..deploy import resolve_runtime, runtime_record, time_in
from ..engine import dist
from ..engine.callbacks import Callback, Event, LoopState
from ..errors import InputError
from .budget import budget_floor, format_cost, min_kept, parse_budget, select_budget
from .cost import build_cost_model, cost_penalty
from .gates import Gates, attach_gates, ungated_copy
from .groups import check_repeats
from .latency import LatencyModel, build_latency_model, tighten
from .surgery import remove_channels

__all__ = ["Selection", "prunable_channels", "pruned_ratio", "select_l1", "select_ratio"]

logger = logging.getLogger(__name__)


def _check_common(alphas: list[torch.Tensor], min_channels: int, round_to: int | None,
                  repeats: list[int] | None) -> list[int]:
    if min_channels < 1:
        raise InputError(f"min_channels must be >= 1, got {min_channels}")
    if round_to is not None and round_to < 1:
        raise InputError(f"round_to must be >= 1 or None, got {round_to}")
    if not alphas:
        raise InputError("there are no gated channels to select from")
    return check_repeats(len(alphas), repeats)


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
        raise InputError(f"min_kept must hold one count per group ({len(sizes)} groups), got {len(min_kept)}")
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
        raise InputError(f"ratio must be in [0, 1), got {ratio}")
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
        raise InputError(f"ratio {ratio} asks to prune {target} of {total} channels but min_channels={min_channels} "
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


@dataclasses.dataclass
class Selection:
    """Everything the selection needs, prepared before training; see the module docstring."""

    gates: Gates
    recipe: object
    input_size: tuple[int, ...]  # one sample's (C, H, W)
    cost_model: object | None = None
    latency_model: object | None = None
    target: float | None = None  # the budget, absolute (MACs, parameters or seconds)
    floor: float | None = None
    dense: float | None = None
    min_kept: list[int] | None = None
    tightened: object | None = None  # the latency tighten result, after `finish`
    measured_floor: float | None = None  # latency: the measured time of the smallest reachable network
    runtime: str = "torch"  # latency: what the cut is timed in (prune.budget.runtime, resolved)
    _sessions: dict = dataclasses.field(default_factory=dict, repr=False)  # onnxruntime: each network exported once

    def times(self, models, input_size, **kw):
        """Time whole networks in the budget's runtime (`deploy.time_in`)."""
        return time_in(self.runtime, models, input_size, sessions=self._sessions, **kw)

    @classmethod
    def prepare(cls, gates: Gates, recipe, input_size, device: torch.device) -> Selection:
        """Pre-flight: cost and latency models, the budget against its floor, exclusions and caps."""
        p, s = recipe.prune, recipe.search
        sel = cls(gates, recipe, tuple(input_size))
        budget = p.budget
        needs_cost = budget is not None or s.cost.mu > 0 or p.exclude or p.max_pruned is not None
        if needs_cost:
            sel.cost_model = build_cost_model(gates, sel.input_size)
        if budget is not None and budget.kind == "latency":
            where = torch.device(budget.device) if budget.device not in (None, "auto") else device
            sel.runtime = resolve_runtime(budget.runtime, where, "prune.budget.runtime")

            def measure() -> LatencyModel:
                model = build_latency_model(gates, sel.cost_model, device=where, batch_size=budget.batch_size,
                                            repeats=budget.repeats)
                if sel.runtime == "torch":
                    return model
                dense = ungated_copy(gates).to(where).eval()
                [t] = sel.times([dense], sel.input_size, batch_size=budget.batch_size, device=where,
                                repeats=budget.repeats)
                return model.scaled(t.median_s, runtime_record(sel.runtime))

            if dist.active():  # timed once, on rank 0: every rank selects with the same tables
                sel.latency_model = LatencyModel(dist.from_main(lambda: measure().table), sel.cost_model)
            else:
                sel.latency_model = measure()
        if p.exclude or p.max_pruned is not None:
            sel.min_kept = min_kept(sel.cost_model, min_channels=p.min_channels, exclude=p.exclude,
                                    max_pruned=p.max_pruned, untraced=gates.gaps.untraced)
        if budget is not None:
            source = sel._source()
            sel.floor, sel.dense = budget_floor(source, budget.kind, **sel._limits())
            sel.target = parse_budget(budget.target, budget.kind, sel.dense)
            if sel.target < sel.floor:
                where = "+".join(p.scope)
                wider = []
                if "coupled" not in p.scope:
                    wider.append("coupled" + (" (instead of branch-input)" if "branch-input" in p.scope else ""))
                if "branch-input" not in p.scope and "coupled" not in p.scope:
                    wider.append("branch-input")
                raise InputError(
                    f"prune.budget: {budget.kind} target {format_cost(sel.target, budget.kind)} "
                    f"({sel.target / sel.dense:.1%} of dense) is below the smallest reachable with scope {where}: "
                    f"{format_cost(sel.floor, budget.kind)} ({sel.floor / sel.dense:.1%}), every gated group at "
                    f"prune.min_channels={p.min_channels}. Raise the target"
                    + (f", or add scope {' or '.join(wider)} to reach further" if wider else ""))
            if budget.kind == "latency":
                sel._check_measured_floor(torch.device(budget.device) if budget.device not in (None, "auto")
                                          else device)
        return sel

    def _check_measured_floor(self, where: torch.device) -> None:
        """Time the smallest network the scopes reach (every group at its minimum) against the target: the per-layer
        model can under-predict overhead-bound networks (small CIFAR nets at batch 1), and a target below the real
        floor can never be met, so it fails here, before training, naming the measured floor."""
        budget = self.recipe.prune.budget
        x = self.gates.example_input
        if x is None:
            return
        scopes = self.recipe.prune.scope
        # every group at its minimum (a noisy latency table can put the model's floor at or below zero)
        lowest = self._select_budget([torch.ones_like(a) for a in self.gates.alphas],
                                     max(self.floor, 1e-9 * self.dense))

        def measure() -> tuple[float, float]:
            slim = ungated_copy(self.gates)
            remove_channels(attach_gates(slim, x[:2], scopes, warn=False), lowest)
            dense = ungated_copy(self.gates)
            _, t = self.times([dense.to(where), slim.to(where)], self.input_size, batch_size=budget.batch_size,
                              device=where, repeats=budget.repeats)
            return t.median_s, t.spread

        floor_s, spread = dist.from_main(measure) if dist.active() else measure()
        self.measured_floor = floor_s
        if floor_s > self.target * (1 + max(0.05, spread)):
            raise InputError(
                f"prune.budget: latency target {format_cost(self.target, 'latency')} is below the measured time of "
                f"the smallest network scope {'+'.join(scopes)} reaches on {where} at batch {budget.batch_size} "
                f"in {self.runtime}: "
                f"{format_cost(floor_s, 'latency')} (run-to-run spread {spread:.0%}; the per-layer model predicted "
                f"{format_cost(self.floor, 'latency')}: this network's time is dominated by per-layer overheads). "
                "Raise the target, time at a larger prune.budget.batch_size, or use a MACs budget")

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _source(self):
        budget = self.recipe.prune.budget
        return self.latency_model if budget is not None and budget.kind == "latency" else self.cost_model

    def _limits(self) -> dict:
        p = self.recipe.prune
        round_to = p.round_to
        if self.latency_model is not None and getattr(self.latency_model, "align", 1) > 1 and round_to is None:
            round_to = self.latency_model.align  # multiples of 8 only when measured faster on this device
        return dict(min_channels=p.min_channels, round_to=round_to, exclude=p.exclude, max_pruned=p.max_pruned,
                    repeat=self.gates.repeats)

    def _select_budget(self, scores, target: float) -> list[torch.Tensor]:
        kind = self.recipe.prune.budget.kind
        return select_budget(scores, self._source(), target, kind, **self._limits())

    def cost(self, keep) -> dict:
        """MACs and parameters the cost model predicts for `keep` (and seconds, with a latency model)."""
        out = {}
        if self.cost_model is not None:
            out["macs"], out["params"] = self.cost_model(keep)
        if self.latency_model is not None:
            out["latency_s"] = self.latency_model(keep)
        return out

    # ---- during the search -------------------------------------------------------------------------------------

    def penalty(self) -> Callable[[], torch.Tensor] | None:
        """The search's cost term μ·Cost(α)/Cost_dense (None when `search.cost.mu` is 0)."""
        c = self.recipe.search.cost
        if c.mu <= 0:
            return None
        source = self.latency_model if c.kind == "latency" else self.cost_model
        return cost_penalty(source.function(c.kind), self.gates.alphas, c.mu, c.tau)

    def stopping_rule(self) -> Callback | None:
        """In ℓ1 mode with a budget: end the search at the first epoch whose non-zero channels fit the budget."""
        p = self.recipe.prune
        if p.mode != "l1" or p.budget is None:
            return None
        selection = self

        class _FitsBudget(Callback):
            events = (Event.EPOCH_END,)

            def apply(self, event: Event, state: LoopState) -> None:
                keep = select_l1(selection.gates.alphas, **selection._ratio_limits())
                value = selection._source().function(p.budget.kind).value(
                    [int(k.sum()) for k in keep])
                if value <= selection.target:
                    logger.info("l1 search: the non-zero channels fit the %s budget after epoch %d; stopping",
                                p.budget.kind, state.epoch)
                    state.stop = True

        return _FitsBudget()

    def shrink_callback(self, problem) -> Callback | None:
        """`search.shrink`: set the problem's per-entry ℓ1 strengths: every entry (`all`, at each epoch's start), or
        the entries the selection would prune now (`losers`: re-chosen at each epoch's start and every
        `search.shrink.every` steps, one host sync each time), at a strength growing linearly over the search."""
        cfg, epochs = self.recipe.search.shrink, self.recipe.search.epochs
        if cfg.which == "none" or cfg.strength <= 0:
            return None
        selection = self

        class _Shrink(Callback):
            events = (Event.EPOCH_START, Event.STEP_END)

            def match(self, event: Event, state: LoopState) -> bool:
                if event == Event.STEP_END:  # losers only, every `every` steps (not after the epoch's last)
                    return cfg.which == "losers" and (state.step + 1) % cfg.every == 0
                return event in self.events

            def apply(self, event: Event, state: LoopState) -> None:
                alphas = selection.gates.alphas
                if cfg.which == "all":
                    problem.shrink = [torch.full_like(a, cfg.strength) for a in alphas]
                    return
                if event == Event.EPOCH_START and state.epoch == 0:
                    # α are still all equal (ties): no losers yet; the first are chosen after `every` steps
                    strengths = [torch.zeros_like(a) for a in alphas]
                else:
                    self.refreshes = getattr(self, "refreshes", 0) + 1
                    keep = selection.select([a.detach() for a in alphas])
                    ramp = cfg.strength * (state.epoch + 1) / epochs
                    strengths = [(~k).to(a.device, a.dtype) * ramp for a, k in zip(alphas, keep, strict=True)]
                if problem.shrink is None:
                    problem.shrink = strengths
                else:  # in place: a captured step keeps reading the same tensors
                    with torch.no_grad():
                        torch._foreach_copy_(problem.shrink, strengths)

        return _Shrink()

    # ---- the cut -----------------------------------------------------------------------------------------------

    def _ratio_limits(self) -> dict:
        p = self.recipe.prune
        return dict(min_channels=p.min_channels, round_to=p.round_to, repeats=self.gates.repeats,
                    min_kept=self.min_kept)

    def select(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep masks for `scores` (one per α entry; higher survives) under the recipe's mode."""
        p = self.recipe.prune
        if p.mode == "ratio":
            return select_ratio(scores, p.ratio, **self._ratio_limits())
        if p.mode == "budget":
            return self._select_budget(scores, self.target)
        keep = select_l1(scores, **self._ratio_limits())
        if p.budget is not None and self._source().function(p.budget.kind).value([int(k.sum()) for k in keep]) \
                > self.target:  # the zeros alone do not reach the budget: cut further, zeros first
            keep = self._select_budget([s * k.to(s.dtype) for s, k in zip(scores, keep, strict=True)], self.target)
        return keep

    def finish(self, scores, keep, x: torch.Tensor) -> list[torch.Tensor]:
        """For a latency budget: time the real cut against the dense model and re-select under a lower model
        target while it misses (`prune.budget.tighten_rounds` selections at most); other modes return `keep`."""
        budget = self.recipe.prune.budget
        if budget is None or budget.kind != "latency" or self.recipe.prune.mode != "budget":
            return keep
        scopes = self.recipe.prune.scope
        device = torch.device(budget.device) if budget.device not in (None, "auto") else x.device

        def cut(k):
            slim = ungated_copy(self.gates)
            remove_channels(attach_gates(slim, x[:2], scopes, warn=False), k)
            return slim.to(device).eval()

        dense = ungated_copy(self.gates).to(device).eval()
        result = tighten(lambda t: self._select_budget(scores, t), cut, dense, self.target, self.input_size,
                         predict=self.latency_model, max_rounds=budget.tighten_rounds, batch_size=budget.batch_size,
                         device=device, times=self.times)
        self.tightened = result
        return result.keep

    def report(self, keep, cost_after: tuple[int, int]) -> dict | None:
        """The budget's part of the report: what was asked (what remains, not what is removed), the floor, the
        prediction and what the cut achieved."""
        budget = self.recipe.prune.budget
        if budget is None:
            return None
        predicted = self.cost(keep)
        out = {"kind": budget.kind, "target": budget.target, "target_abs": self.target,
               "target_fraction": self.target / self.dense, "dense": self.dense, "floor": self.floor,
               "floor_fraction": self.floor / self.dense,
               "meaning": "the slim model keeps at most `target` of the dense model's cost",
               "predicted": predicted.get("latency_s" if budget.kind == "latency" else budget.kind)}
        if budget.kind in ("macs", "params"):
            achieved = cost_after[0 if budget.kind == "macs" else 1]
            out.update(achieved=achieved, achieved_fraction=achieved / self.dense, met=achieved <= self.target)
        elif self.tightened is not None:
            t = self.tightened
            out.update(achieved=t.timing.median_s, achieved_fraction=t.timing.median_s / t.dense_timing.median_s,
                       spread=t.timing.spread, dense_measured=t.dense_timing.median_s, met=t.met,
                       tighten=t.history, device=str(budget.device or "run device"), batch_size=budget.batch_size,
                       measured_floor=self.measured_floor, runtime=runtime_record(self.runtime),
                       tables=("eager PyTorch per-layer tables scaled to the dense network's time in "
                               f"{self.runtime}; the floor and every cut timed as whole exported networks"
                               if self.runtime != "torch" else "eager PyTorch per-layer tables"))
        return out
