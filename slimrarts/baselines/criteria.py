"""One-shot channel scores from Torch-Pruning's importance criteria, on slimrarts' gated channel groups.

Each criterion scores the channels of every `gates.groups[i]` with a torch-pruning importance class applied to that
group's torch-pruning group, on the dense trained model (no training phase). Higher survives, so the scores go
straight into `select_ratio`, the same selection RARTS uses: the only difference from RARTS is the scores.

Which layers a criterion reads:
- `l1`, `fpgm` score the *filters that make* the channels (the papers' definition): the out-channel rows of every
  non-depthwise conv/linear of the group (one for an `internal` group, every producer of a `coupled` group, averaged).
  A `branch-input` group has no producer of its own (the residual stream is made outside the branch and keeps its
  width); there they score what the branch removes with the channel: the input-channel slices of its consumers.
- `taylor`, `group-norm` score the whole group as DepGraph does: every conv/linear (out rows and in-channel
  slices) and norm in it; for `branch-input`, the entrance norm and its consumers' input slices. (torch-pruning
  1.6's TaylorImportance reads no BatchNorm: its norm branch tests the GroupNorm handler. Taylor's group is then
  the conv/linear slices; the tests pin this.)

Normaliser: torch-pruning's global pruning (MetaPruner with global_pruning=True) ranks the concatenated per-group
scores, each already divided by its importance's `normalizer`; all its importance classes default to "mean", and so
do we (`NORMALIZER`). Dividing by the group's mean puts every group on a unit-mean scale, so one global threshold
compares a channel with its own group's typical channel rather than layers with larger fan-in or weight scale
winning wholesale; unlike "standarization"/"gaussian" it keeps a zero score at zero (a dead channel stays the first
to go) and unlike "max" it is not set by one outlier. A group whose scores are all zero (0/0) scores 0 throughout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch
import torch_pruning as tp
from torch_pruning.dependency import Dependency, Group
from torch_pruning.pruner import function as tpf

from ..engine import dist
from ..engine.step import batches_on
from ..engine.task import CLASSIFICATION, Task
from ..errors import InputError
from ..modes import evaluating, training

__all__ = ["NORMALIZER", "TAYLOR_BATCHES", "CriterionInfo", "OneShotScores", "criterion_info", "criterion_scores",
           "list_criteria", "score_channels", "tp_group"]

NORMALIZER = "mean"
# Batches of training data whose loss gradient Taylor uses: torch-pruning's own criteria benchmark
# (reproduce/benchmark_importance_criteria.py) accumulates 10; at batch 64-128 that is 640-1280 images, a few
# seconds on a GPU, and averages out most of one batch's gradient noise.
TAYLOR_BATCHES = 10

_OUT_FNS = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
_IN_FNS = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)


@dataclasses.dataclass(frozen=True)
class CriterionInfo:
    """What a criterion is, where it comes from and what it needs; the registry reads it."""

    name: str
    source: str
    importance: str  # the torch-pruning class and arguments
    layers: str  # which layers of each group it reads
    needs_grad: bool  # gradients of the training loss
    needs_data: bool  # batches of the training set

    @property
    def note(self) -> str:
        """One line for reports: the criterion, its source and its torch-pruning class."""
        return f"{self.name}: {self.source}; torch-pruning {self.importance}, one-shot on the dense model"


@dataclasses.dataclass(frozen=True)
class OneShotScores:
    """A one-shot criterion's result for the pipeline: per-group scores (higher survives); no search phase ran.

    `seconds` is the scoring time (weights only, or `batches` forward/backward passes for Taylor), not training.
    """

    criterion: str
    scores: list[torch.Tensor]
    seconds: float
    batches: int
    note: str


_Scorer = Callable[[], tp.importance.Importance]
_REGISTRY: dict[str, tuple[CriterionInfo, _Scorer, bool]] = {}


def _criterion(info: CriterionInfo, *, filters_only: bool):
    """Register `fn() -> Importance` under `info.name`; `filters_only`: score the producing filters, not the group."""

    def wrap(fn: _Scorer) -> _Scorer:
        if info.name in _REGISTRY:
            raise InputError(f"criterion {info.name!r} is already registered")
        _REGISTRY[info.name] = (info, fn, filters_only)
        return fn

    return wrap


@_criterion(CriterionInfo(
    "l1", "Li, Kadav, Durdanovic, Samet, Graf, 'Pruning Filters for Efficient ConvNets', ICLR 2017",
    f"MagnitudeImportance(p=1, group_reduction='mean', normalizer={NORMALIZER!r})",
    "filters making the channels (branch-input: consumers' input slices)", needs_grad=False, needs_data=False),
    filters_only=True)
def _l1() -> tp.importance.Importance:
    return tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=NORMALIZER)


@_criterion(CriterionInfo(
    "taylor", "Molchanov, Mallya, Tyree, Frosio, Kautz, 'Importance Estimation for Neural Network Pruning', "
    "CVPR 2019 (first-order)",
    f"TaylorImportance(multivariable=True, group_reduction='mean', normalizer={NORMALIZER!r})",
    "whole group's conv/linear slices; gradient of the mean cross-entropy over a few training batches, eval mode",
    needs_grad=True,
    needs_data=True), filters_only=False)
def _taylor() -> tp.importance.Importance:
    # multivariable: |Σ_s g_s·w_s| over each layer's slice of the channel, the paper's joint first-order change of
    # the loss when the channel's parameters are removed (the default, Σ_s |g_s·w_s|, is an element-wise bound)
    return tp.importance.TaylorImportance(multivariable=True, group_reduction="mean", normalizer=NORMALIZER)


@_criterion(CriterionInfo(
    "fpgm", "He, Liu, Wang, Hu, Yang, 'Filter Pruning via Geometric Median for Deep Convolutional Neural Networks "
    "Acceleration', CVPR 2019",
    f"FPGMImportance(p=1, group_reduction='mean', normalizer={NORMALIZER!r})",
    "filters making the channels (branch-input: consumers' input slices)", needs_grad=False, needs_data=False),
    filters_only=True)
def _fpgm() -> tp.importance.Importance:
    # torch-pruning measures distances between |w|^p; p=1 (|w|) is the closest to the paper's distances between the
    # filters w themselves (equal for filters of one sign); its benchmark's p=2 would compare squared weights
    return tp.importance.FPGMImportance(p=1, group_reduction="mean", normalizer=NORMALIZER)


@_criterion(CriterionInfo(
    "group-norm", "Fang, Ma, Song, Mi, Wang, 'DepGraph: Towards Any Structural Pruning', CVPR 2023",
    f"GroupMagnitudeImportance(p=2, group_reduction='mean', normalizer={NORMALIZER!r})",
    "whole group: conv/linear out rows and input slices, norm γ", needs_grad=False, needs_data=False),
    filters_only=False)
def _group_norm() -> tp.importance.Importance:
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=NORMALIZER)


def list_criteria() -> list[str]:
    return sorted(_REGISTRY)


def criterion_info(name: str) -> CriterionInfo:
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[CriterionInfo, _Scorer, bool]:
    if name not in _REGISTRY:
        raise InputError(f"criterion {name!r} is unknown; choose one of {', '.join(list_criteria())}")
    return _REGISTRY[name]


def _item(group: Group, dep: Dependency, idxs: list[int], root_idxs: list[int]) -> None:
    group.add_dep(dep, idxs)
    group[len(group) - 1].root_idxs = root_idxs  # the importance classes scatter each item's scores by root index


def tp_group(gates, i: int) -> Group:
    """The torch-pruning group (all channels) of `gates.groups[i]`, from `gates.dg`.

    `internal` and `coupled` groups are the graph's own group rooted at the group's root layer (the group
    `surgery._prune_group` removes). A `branch-input` group is not a graph group: it removes the entrance norm's
    channels and the matching input slices of the branch's consumers only, so it is built from those layers.
    """
    group = gates.groups[i]
    dg = gates.dg
    if dg is None:
        raise InputError("these gates carry no dependency graph (gates.dg is None); attach them with attach_gates")
    modules = dict(gates.model.named_modules())
    full = list(range(group.size))
    if group.scope != "branch-input":
        root = modules[group.root]
        return dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, full)
    out = Group()
    for name, fn in [(group.root, "prune_out_channels")] + [(c, "prune_in_channels") for c in group.consumers]:
        module = modules[name]
        handler = getattr(dg.get_pruner_of_module(module), fn)
        node = dg.module2node[module]
        _item(out, Dependency(handler, handler, source=node, target=node), full, full)
    return out


def _filters(group: Group, scope: str) -> Group:
    """The items of `group` that make its channels (branch-input: the consumers' input slices)."""
    fns = _IN_FNS if scope == "branch-input" else _OUT_FNS
    out = Group()
    for item in group.items:
        if item.dep.handler in fns:
            _item(out, item.dep, item.idxs, item.root_idxs)
    return out


@contextlib.contextmanager
def _loss_gradients(gates, loader, batches: int, device: torch.device, task: Task = CLASSIFICATION) -> Iterator[int]:
    """Inside the block every model parameter's `.grad` is the gradient of the task's mean loss (cross-entropy by
    default) over `batches` batches of `loader` (eval mode, gates at 1 and not differentiated; a task whose model
    has no eval-mode loss, detection, runs in train mode with every buffer put back); yields the batch count. The
    model's mode, gradients and `requires_grad` flags are restored afterwards, and BN running statistics are left
    as they were."""
    model = gates.model
    params = list(model.parameters())
    saved = [(p.grad, p.requires_grad) for p in params]
    ones = [torch.ones_like(a, requires_grad=False) for a in gates.alphas]
    buffers = [] if task.eval_loss else [b.detach().clone() for b in model.buffers()]  # train mode updates them
    mode = evaluating(model) if task.eval_loss else training(model)
    with mode:
        try:
            for p in params:
                p.grad = None
                p.requires_grad_(True)
            seen = []
            with gates.using(ones), torch.enable_grad():
                for x, y in batches_on(loader, device, task=task):
                    if len(seen) == batches:
                        break
                    task.loss(model(*(task.eval_args(x) if task.eval_loss else task.train_args(x, y))), y).backward()
                    seen.append(task.count(y))
            if not seen:
                raise InputError("the Taylor criterion needs training batches, but the loader yielded none")
            with torch.no_grad():
                for p in params:  # a layer the loss does not reach (an unused auxiliary head): its gradient is 0
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in params if p.grad is not None]
                torch._foreach_div_(grads, float(len(seen)))
            dist.all_reduce_(grads, "mean")  # in a process group: over every rank's shard of the batches
            yield len(seen)
        finally:
            for p, (grad, flag) in zip(params, saved, strict=True):
                p.grad = grad
                p.requires_grad_(flag)
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(list(model.buffers()), buffers)


def criterion_scores(name: str, gates, loader=None, *, batches: int = TAYLOR_BATCHES,
                     device: torch.device | None = None, task: Task = CLASSIFICATION) -> list[torch.Tensor]:
    """Per-group channel scores of criterion `name` on the dense model: one CPU float vector per `gates.groups[i]`.

    `loader` yields `(x, y)` training batches; only criteria that need data (`taylor`) read it, `batches` of them,
    on `device` (default: the model's), read as `task`'s (`engine.task`). Scores are normalised per group by
    `NORMALIZER`; higher survives.

    Raises:
        ValueError: an unknown criterion, a criterion that needs data without a `loader`, `batches` < 1, or a group
            with no layer the criterion can score.
    """
    return score_channels(name, gates, loader, batches=batches, device=device, task=task).scores


def score_channels(name: str, gates, loader=None, *, batches: int = TAYLOR_BATCHES,
                   device: torch.device | None = None, task: Task = CLASSIFICATION) -> OneShotScores:
    """`criterion_scores` with what the pipeline records: the time it took and the batches it read."""
    info, make, filters_only = _lookup(name)
    if info.needs_data and loader is None:
        raise InputError(f"criterion {name!r} needs training batches (gradients of the loss); pass a loader")
    if batches < 1:
        raise InputError(f"batches must be >= 1, got {batches}")
    t0 = time.perf_counter()
    importance = make()
    device = device if device is not None else next(gates.model.parameters()).device
    ctx = _loss_gradients(gates, loader, batches, device, task) if info.needs_grad else contextlib.nullcontext(0)
    scores = []
    with ctx as used:
        for i, group in enumerate(gates.groups):
            tg = tp_group(gates, i)
            if filters_only:
                tg = _filters(tg, group.scope)
            s = importance(tg) if len(tg) else None
            if s is None:
                raise InputError(f"criterion {name!r} finds no layer to score in group {group.name!r} "
                                 f"(scope {group.scope}); use another criterion or scope")
            s = torch.nan_to_num(s.detach().float().cpu(), nan=0.0)  # an all-zero group: 0/0 under "mean"
            if s.numel() != group.size:
                raise RuntimeError(f"criterion {name!r} gave {s.numel()} scores for group {group.name!r} of "
                                   f"{group.size} channels")
            scores.append(s)
    return OneShotScores(criterion=name, scores=scores, seconds=time.perf_counter() - t0, batches=used or 0,
                         note=info.note)
