"""`WidthSearch`: width search driven by a training loop of your own, over the machinery `prune()` runs on.

    search = WidthSearch(model, example_input, method="rarts", config={...})
    for batch_t, batch_v in pairs:            # your data, your schedule
        search.step(batch_t, batch_v)         # two-net and bilevel methods: one iteration of w, y and α
    # one-net (joint) search inside an ordinary loop:
    #   loss = criterion(model(x), y); loss.backward(); search.regularize(); optimizer.step()
    slim = search.cut(budget={"macs": "50%"}, recalibrate=train_loader)   # a plain nn.Module, exact removal

`prune()` is built on this object: its search stage makes one and runs its epochs (`search_width`), its select
and remove stages are the object's `select` and `remove`. The helpers here (the recipe from keyword arguments,
the task, the gates and their checks, the weights a two-net search is cut from) are the ones prune() uses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from .baselines import reference_counts
from .baselines.slimming import SlimmingPenalty, train_sparse
from .config import to_dict
from .engine import dist
from .engine.recalibrate import recalibrate_bn
from .engine.step import TrainStep
from .engine.task import Task, get_task
from .errors import InputError, InputTypeError
from .methods import get_method
from .preflight import frozen_layers
from .recipe import Recipe, load_recipe
from .search.base import SearchState
from .search.loop import load_search_state, search_from_section, search_state_dict, state_from_section
from .search.problem import NetProblem, make_state
from .width import Gates, Skipped, attach_gates, prunable_channels, remove_channels, require_groups
from .width.heads import raw_output_modules
from .width.scores import init_from_magnitude, search_scores
from .width.select import Selection

__all__ = ["WidthSearch", "resolve_task"]


def _resolve_recipe(config: Recipe | dict | str | None, *, ratio=None, budget=None, mode=None, method=None,
                    scope=None, search_epochs=None, finetune_epochs=None, device=None) -> Recipe:
    """`config` with `prune()`'s keyword arguments on top (those given), checked."""
    if budget is not None:
        if ratio is not None:
            raise InputError("give ratio (the share of channels to prune) or budget (what the slim model keeps of "
                             "the dense cost), not both")
        budget = _budget_section(budget)
        mode = mode or "budget"
    overrides = {"prune.ratio": ratio, "prune.budget": budget, "prune.mode": mode, "search.method": method,
                 "prune.scope": [scope] if isinstance(scope, str) else scope, "search.epochs": search_epochs,
                 "finetune.epochs": finetune_epochs, "device": str(device) if device is not None else None}
    if isinstance(config, Recipe):
        base = to_dict(config)
    elif isinstance(config, dict):
        base = copy.deepcopy(config)
    elif config is None:
        base = {}
    else:
        base = config
    items = [f"{k}={json.dumps(v, default=_plain)}" for k, v in overrides.items() if v is not None]
    return load_recipe(base, items)


def _plain(value: Any) -> Any:
    """A numpy or torch scalar as the Python number it holds (the recipe's values are plain)."""
    if hasattr(value, "item") and tuple(getattr(value, "shape", (None,))) == ():
        return value.item()
    raise InputTypeError(f"{value!r} ({type(value).__name__}) is not a plain value for a recipe setting")


def _budget_section(budget: dict) -> dict:
    """`{"macs": "50%"}` (one kind: its target) or a full `prune.budget` mapping, as the recipe section."""
    if not isinstance(budget, dict):
        raise InputTypeError(f"budget must be a dict such as {{'macs': '50%'}}, got {type(budget).__name__} {budget!r}")
    kinds = [k for k in ("macs", "params", "latency") if k in budget]
    if len(kinds) > 1:
        raise InputError(f"budget names {' and '.join(kinds)}: give one kind ({{'macs': '50%'}})")
    if kinds:
        out = {k: v for k, v in budget.items() if k != kinds[0]}
        return {**out, "kind": kinds[0], "target": budget[kinds[0]]}
    return dict(budget)



@torch.no_grad()
def _take_final_weights(model: nn.Module, state: SearchState, which: str) -> None:
    """Put the weights the slim model is cut from into `model`: w (already there), y, or their mean."""
    if which == "w" or state.y is None:
        return
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for k, y in state.y.items():  # the trained parameters (frozen ones are shared by both nets)
        params[k].copy_(y if which == "y" else (params[k] + y) / 2)
    for k, b in buffers.items():
        other = state.y_buffers[k]
        if which == "y" or not b.is_floating_point():
            b.copy_(other)
        else:
            b.copy_((b + other) / 2)


def resolve_task(task: Task | str | None, recipe: Recipe, *, loss_fn: Callable | None = None,
                 metric_fn: Callable | None = None) -> Task:
    """The task a run learns: `task` (a name or an `engine.task.Task` object) or else the recipe's `task` section,
    with a user's `loss_fn` / `metric_fn` on top (`engine.task.CustomTask`)."""
    if task is None or isinstance(task, str):
        name = task or recipe.task.name
        options = recipe.task.options() if name == recipe.task.name else {}
        task = get_task(name, **options)
    else:
        task = get_task(task)
    if recipe.finetune.distill is not None and task.name != "classification":
        raise InputError(f"finetune.distill matches a classifier's class probabilities; the {task.name} task has no "
                         "such output here: remove finetune.distill")
    if loss_fn is not None or metric_fn is not None:
        task = get_task(task, loss_fn=loss_fn, metric_fn=metric_fn)
    if recipe.finetune.distill is not None and getattr(task, "loss_fn", None) is not None:
        raise InputError("finetune.distill fine-tunes on its own loss (cross-entropy + KL to the dense model), "
                         "which would replace your loss_fn: remove finetune.distill, or the loss_fn")
    return task



def _check_gates(gates: Gates, recipe: Recipe) -> None:
    """Fail before any training when the gated model cannot meet the recipe (budgets: `Selection.prepare`)."""
    p = recipe.prune
    require_groups(gates, p.scope)
    if p.mode == "ratio" and not p.reference:
        total = gates.num_channels
        prunable = prunable_channels(gates.groups, p.min_channels)
        if round(p.ratio * total) > prunable:
            raise InputError(f"prune.ratio={p.ratio} asks for {round(p.ratio * total)} of {total} gated channels, but "
                             f"prune.min_channels={p.min_channels} leaves only {prunable} prunable")
    if p.reference:
        reference_counts(p.reference, gates)


def _attach(model: nn.Module, x: torch.Tensor, recipe: Recipe) -> tuple[Gates, Selection]:
    """Gates on `model` for the recipe's scopes (frozen layers left out, each listed with the reason) and the
    selection prepared for them; everything here fails before any training."""
    frozen = frozen_layers(model)
    gates = attach_gates(model, x[:2], recipe.prune.scope, ignored=[m for _, m in frozen])
    gates.skipped.extend(Skipped(name, "frozen: its weight does not require grad, so it is not trained or pruned",
                                 channels=m.weight.shape[0]) for name, m in frozen)
    gates.guard_untraced(recipe.prune.exclude)  # a module the trace did not see stops the run at its first call
    _check_gates(gates, recipe)
    return gates, Selection.prepare(gates, recipe, tuple(x.shape[1:]), x.device)


def remove_checked(gates: Gates, keep: list[torch.Tensor], model: nn.Module, x: torch.Tensor) -> dict:
    """Fold the gates and remove the channels `keep` drops; the slim model's output on `x` must equal the masked
    gated one's (a detection model: its raw head outputs, before NMS). Returns the width spec. prune()'s cut of
    every method, a baseline's included."""
    heads = raw_output_modules(model)
    spec = remove_channels(gates, keep, check_input=x, check_modules=heads or None)
    if spec["max_abs_diff"] > 1e-3 * max(1.0, spec["max_abs_ref"]):
        raise RuntimeError(f"channel removal changed the model's output (max |Δ| {spec['max_abs_diff']:.3g} against "
                           f"outputs up to {spec['max_abs_ref']:.3g}); please report this model: the slim model "
                           "would not be the searched one")
    return spec


# one-net methods without α that `regularize` drives: the name and the penalty it trains with
REGULARIZED: dict[str, type] = {"slimming": SlimmingPenalty}


class WidthSearch:
    """Width search over `model` that any training loop can drive: α (one score per prunable output channel) on
    gates attached to `model` in place, the method's weight copies and optimizers, the selection and the cut.

    Args:
        model: the network, on the device it trains on (gates are attached to it; its parameters are w).
        example_input: a float batch of inputs on that device (the trace reads its first 2, the removal check all).
        method: a search method with α (`rarts` default, `rarts-jacobi`, `darts1`, `darts2`, `milenas`: `step`
            with two batches; `joint`: `regularize` inside your loop, or `step` with one batch), or `slimming`
            (Network Slimming: the ℓ1 subgradient on BN γ by `regularize`, channels ranked by |γ|).
        scope: the gated channels (`internal`, `branch-input`, `coupled`, or a list).
        config: a `Recipe`, its dict or a YAML path: `search` (λ, β, optimizers and their learning rates, `score`,
            `final_weights`, `init`, `amp`) and `prune` (scope, mode, ratio or budget, `min_channels`, `round_to`,
            `recalibrate`); `method`/`scope` on top. Epoch counts and schedules there are not used: your loop
            decides how long, and drives the learning rates (`optimizers`, e.g. with `torch.optim.lr_scheduler`).
        task, loss_fn, metric_fn: what the model learns, as in `prune()` (default classification).
        init_weights: apply the method's start to the weights (slimming's `baselines.init_gamma`, `search.init:
            magnitude`'s rescaling); False for a search about to `load_state_dict` over weights already trained
            under it (a resumed run), which must not be changed again.

    Nothing prints. Two-net methods keep the second copy y beside the model's own weights w; the slim model is cut
    from the copy `search.final_weights` names (`y`, `w` or their mean), put into `model` by `cut`/`select`.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, method: str | None = None,
                 scope: str | list[str] | None = None, config: Recipe | dict | str | None = None,
                 task: Task | str | None = None, loss_fn: Callable | None = None,
                 metric_fn: Callable | None = None, init_weights: bool = True):
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"WidthSearch: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
            raise InputTypeError("WidthSearch: example_input must be a float tensor batch on the model's device, got "
                                 f"{type(example_input).__name__}")
        self.recipe = recipe = config if isinstance(config, Recipe) and method is None and scope is None else \
            _resolve_recipe(config, method=method, scope=scope)
        self.info = get_method(recipe.search.method)
        if not self.info.has_alpha and self.info.name not in REGULARIZED:
            raise InputError(f"WidthSearch: method {recipe.search.method!r} is a {self.info.kind} without α; give a "
                             "search method (rarts, rarts-jacobi, darts1, darts2, milenas, joint) or slimming; "
                             "criteria such as group-norm need no loop of yours: slimrarts.prune(..., method=...)")
        self.task = resolve_task(task, recipe, loss_fn=loss_fn, metric_fn=metric_fn)
        s, p = recipe.search, recipe.prune
        self.model, self.example = model, example_input
        self.gates, self.selection = _attach(model, example_input, recipe)
        # slimming: α frozen, γ set to `baselines.init_gamma`; its ℓ1 term is the only thing `regularize` adds
        if self.info.name in REGULARIZED:
            settings = recipe.baselines if init_weights else dataclasses.replace(recipe.baselines, init_gamma=None)
            self.penalty = REGULARIZED[self.info.name](model, self.gates, settings)
        else:
            self.penalty = None
        if s.init == "magnitude" and self.penalty is None and init_weights:  # before y: both nets start alike
            init_from_magnitude(self.gates)
        self.problem = NetProblem(model, self.gates.alphas, amp=s.amp, l1=p.l1 if p.mode == "l1" else 0.0,
                                  penalty=self.selection.penalty(), task=self.task)
        if s.score == "grad":
            self.problem.importance = [torch.zeros_like(a, requires_grad=False) for a in self.gates.alphas]
        self.state: SearchState = state_from_section(self.problem, s) if self.penalty is None else \
            make_state(model, self.problem.arch, "joint", optim_w=s.optim, optim_arch=s.optim_arch)
        self._train_step = None if self.penalty is None else TrainStep(
            model, self.state.opt_w, device=self.problem.device, amp=s.amp, task=self.task,
            after_backward=self.penalty.add_subgradient)
        self.result = None  # the epochs' record when `run` drove it (prune's search stage)
        self.keep: list[torch.Tensor] | None = None
        self.spec: dict | None = None
        self._final_taken = False

    # ---- what a loop reads and drives -------------------------------------------------------------------------
    @property
    def alphas(self) -> list[torch.Tensor]:
        """α, one tensor per channel group (not in `model.parameters()`)."""
        return self.gates.alphas

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers of w, y (two-net methods) and α (`alpha`; slimming has none): `torch.optim.Optimizer`s
        whose `param_groups` learning rates a `torch.optim.lr_scheduler` (or your code) may set between steps."""
        out = {"w": self.state.opt_w}
        if self.penalty is None:  # slimming learns no α (its scores are |γ|)
            out["alpha"] = self.state.optim_arch
        if self.state.opt_y is not None:
            out["y"] = self.state.opt_y
        return out

    @property
    def note(self) -> str:
        """What the method's search was, for a report (slimming: its sparsity; else empty)."""
        return self.penalty.note if self.penalty is not None else ""

    @property
    def importance(self) -> list[torch.Tensor] | None:
        """Σ |α ⊙ ∇α| over the α-steps so far (`search.score: grad`), else None."""
        return self.problem.importance

    def _batch(self, batch):
        x, y = self.task.to(*self.task.split(batch), self.problem.device)
        return x, y

    def step(self, batch_t, batch_v=None) -> None:
        """One iteration of the method: for split-data methods `batch_t` from D_t and `batch_v` from D_v (two
        disjoint halves of the training set), for `joint` and `slimming` one batch (slimming: one step of
        `optimizers["w"]` with the ℓ1 subgradient, as prune() trains). Batches are as your loader gives them
        (`(images, targets)`), moved to the model's device."""
        if self._final_taken:
            raise InputError("WidthSearch.step: the search was cut (or selected) already; make a new WidthSearch")
        if self.info.data == "split" and batch_v is None:
            raise InputError(f"WidthSearch.step: {self.info.name} learns w on D_t and α on D_v; pass step(batch_t, "
                             "batch_v) with batches from two disjoint halves of the training set")
        if self.info.data == "whole" and batch_v is not None:
            raise InputError(f"WidthSearch.step: {self.info.name} trains on one batch at a time; pass step(batch)")
        self.model.train()
        if self._train_step is not None:
            self._train_step(*self._batch(batch_t))
            return
        self.info.step(self.problem, self.state, self._batch(batch_t),
                       self._batch(batch_v) if batch_v is not None else None)

    def regularize(self, *, grad_scale: float | torch.Tensor | None = None) -> bool:
        """For a one-net search inside your own loop: call it after `loss.backward()` (after the last backward of
        an accumulated step) and before your optimizer's step.

        `joint`: one α step with the gradient your backward left in α (plus the cost term's, the ℓ1 proximal step
        of `prune.mode: l1` and the importance of `search.score: grad`, as prune's joint search does), then α's
        gradients are cleared; only α is stepped here, your optimizer steps the weights. In a process group α's
        gradients are averaged over the ranks first (your DDP averages only the weights'), so α stays the same
        on every rank. `slimming`: the ℓ1 subgradient s·sign(γ) is added to the BN γ gradients your optimizer is
        about to use (after DDP averaged them; unscaled, so call it after a GradScaler's `unscale_`).

        `grad_scale`: the factor a `torch.amp.GradScaler` multiplied the loss by (`scaler.get_scale()`): α's
        gradients are divided by it, and when a gradient of α or of the model's weights is not finite (the scaler
        skips that step) α is not stepped. α is not stepped either when no backward reached it (all its
        gradients None: a skipped training step). Returns whether α was stepped (slimming: True)."""
        if self.info.two_nets or self.info.data == "split":
            raise InputError(f"WidthSearch.regularize is for a one-net search in your loop (method joint or "
                             f"slimming); {self.info.name} keeps its own weight copies: call step(batch_t, batch_v)")
        if self.penalty is not None:
            self.penalty.add_subgradient()
            return True
        from .search.base import arch_step

        if all(a.grad is None for a in self.gates.alphas):
            return False
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in self.gates.alphas]
        dist.all_reduce_(grads, "mean")
        stepped = True
        if grad_scale is not None:
            device = grads[0].device
            found = torch.zeros(1, device=device)
            inv = torch.as_tensor(1.0 / grad_scale, dtype=torch.float32, device=device).reshape(1)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)  # α: unscaled and checked, fused
            weights = [p.grad for p in self.state.w.values() if p.grad is not None]
            if weights:  # the weights' gradients: one foreach norm (non-finite where any entry is)
                found += (~torch.isfinite(torch.stack(torch._foreach_norm(weights)))).any()
            stepped = not bool(found)  # one sync; the scaler skips its step then too (and syncs to know it)
        if stepped:
            arch_step(self.problem, self.state, grads)
        for a in self.gates.alphas:
            a.grad = None
        return stepped

    def run(self, loaders, *, run_dir=None, resume: bool = False, progress: bool = True,
            callbacks: Iterable = ()) -> None:
        """The library's own loop: the recipe's `search.epochs` over `loaders` (`search_t`/`search_v`, or `train`
        for joint and slimming) with its schedules, checkpoints and stopping rules; what `prune()` runs. Sets
        `result`."""
        if self.penalty is not None:
            self.result = train_sparse(self.model, self.penalty, loaders, self.recipe, device=self.problem.device,
                                       run_dir=run_dir, resume=resume, progress=progress, task=self.task,
                                       optimizer=self.state.opt_w)
            return
        extra = [cb for cb in (self.selection.stopping_rule(), self.selection.shrink_callback(self.problem))
                 if cb is not None]
        _, self.result = search_from_section(self.problem, self.recipe.search, loaders, run_dir=run_dir,
                                             resume=resume, progress=progress, callbacks=[*extra, *callbacks],
                                             state=self.state)

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self, *, weights: bool = True) -> dict:
        """α, w (and y) with their buffers, the optimizers and the importance: save it with your checkpoints.

        `weights=False`: α, its optimizer and the importance only, for a one-net search whose weights your own
        checkpoint holds (the Lightning callback saves this)."""
        full = search_state_dict(self.problem, self.state)
        if not weights:
            if self.info.two_nets:
                raise InputError(f"WidthSearch.state_dict(weights=False): {self.info.name} keeps its own copy y of "
                                 "the weights, which no checkpoint of yours holds; save state_dict()")
            full = {k: full[k] for k in ("arch", "optim_arch", "importance") if k in full}
        return {"method": self.info.name, "weights": weights, "search": full}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a search over the same model and settings (in place)."""
        if not isinstance(state, dict) or "search" not in state:
            raise InputError("WidthSearch.load_state_dict: not a WidthSearch.state_dict() (no 'search' entry)")
        if state.get("method") != self.info.name:
            raise InputError(f"WidthSearch.load_state_dict: the state is of method {state.get('method')!r}, this "
                             f"search runs {self.info.name!r}")
        saved = state["search"]
        if state.get("weights", True):
            load_search_state(self.problem, self.state, saved)
            return
        with torch.no_grad():
            torch._foreach_copy_(self.problem.arch, saved["arch"])
            if self.problem.importance is not None and "importance" in saved:
                torch._foreach_copy_(self.problem.importance, saved["importance"])
        self.state.optim_arch.load_state_dict(saved["optim_arch"])

    # ---- the cut ------------------------------------------------------------------------------------------------
    def _selection(self, ratio, budget, mode) -> tuple[Recipe, Selection]:
        if ratio is None and budget is None and mode is None:
            return self.recipe, self.selection
        recipe = _resolve_recipe(self.recipe, ratio=ratio, budget=budget, mode=mode)
        return recipe, Selection.prepare(self.gates, recipe, tuple(self.example.shape[1:]), self.example.device)

    def scores(self, recipe: Recipe | None = None) -> list[torch.Tensor]:
        """The scores the cut ranks α's entries by (higher survives; `search.score`; slimming: |γ|)."""
        if self.penalty is not None:
            return self.gates.entry_scores(self.penalty.scores())
        return search_scores(self.gates, (recipe or self.recipe).search.score, self.problem.importance)

    def sync_buffers(self) -> None:
        """In a process group, average the BatchNorm running statistics of w (and y) over the ranks, so every rank
        holds the same model: call it at the end of an epoch (prune()'s loop does; `select` and `cut` do too).
        Training-mode steps do not read them. Without a group: nothing."""
        dist.sync_buffers_([*self.state.w_buffers.values(), *(self.state.y_buffers or {}).values()])

    def take_final_weights(self) -> None:
        """Put the weights the slim model is cut from into `model` (`search.final_weights`: y, w or their mean);
        once (`select` and `cut` call it; in a process group after `sync_buffers`)."""
        if not self._final_taken:
            self.sync_buffers()
            _take_final_weights(self.model, self.state, self.recipe.search.final_weights)
            self._final_taken = True

    def select(self, *, ratio: float | None = None, budget: dict | None = None, mode: str | None = None,
               scores: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The keep masks (one boolean tensor per group) under the recipe's mode, or the `ratio` / `budget` /
        `mode` given here (a budget's floor is checked now; a latency budget times the cut). `scores` default
        to the search's. In a process group the masks are rank 0's, on every rank."""
        recipe, sel = self._selection(ratio, budget, mode)
        self.take_final_weights()
        scores = self.scores(recipe) if scores is None else scores

        def choose() -> list[torch.Tensor]:
            return sel.finish(scores, sel.select(scores), self.example)

        # in a process group rank 0 chooses and every rank cuts the same channels (a latency budget's timing
        # differs from rank to rank)
        self.keep = dist.from_main(lambda: [k.cpu() for k in choose()]) if dist.active() else choose()
        return self.keep

    def remove(self, keep: list[torch.Tensor] | None = None) -> dict:
        """Fold α into the weights and remove the channels `keep` drops, for real; the slim model's output must
        equal the masked gated one's (checked on the example input; a detector's raw heads). Returns the width
        spec; `model` is now a plain, smaller nn.Module."""
        keep = self.keep if keep is None else keep
        if keep is None:
            raise InputError("WidthSearch.remove: no keep masks; call select() first, or cut()")
        self.keep, self.spec = keep, remove_checked(self.gates, keep, self.model, self.example)
        return self.spec

    def cut(self, *, ratio: float | None = None, budget: dict | None = None, mode: str | None = None,
            recalibrate: Iterable | None = None, batches: int | None = None) -> nn.Module:
        """`select`, `remove`, then (with a `recalibrate` loader of training batches) the BatchNorm statistics
        re-estimated on `batches` of them (default `prune.recalibrate`). Returns `model`, slim."""
        self.select(ratio=ratio, budget=budget, mode=mode)
        self.remove()
        if recalibrate is not None:
            n = self.recipe.prune.recalibrate if batches is None else batches
            recalibrate_bn(self.model, recalibrate, n, device=self.problem.device, task=self.task,
                           channels_last=self.recipe.finetune.channels_last)
        return self.model
