"""A search as a phase of the one epoch loop: pairs D_t/D_v batches, runs a method's step, schedules learning rates."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..engine import dist
from ..engine.callbacks import Callback, LoopState
from ..engine.epochs import PhaseResult, run_epochs
from ..engine.graph import GraphedStep
from ..engine.schedule import schedule_fn
from ..engine.step import batches_on
from ..errors import InputError
from ..methods import get_method
from .base import SearchState
from .problem import NetProblem, make_state

__all__ = ["load_search_state", "run_search", "search_from_section", "search_state_dict", "state_from_section"]


class _Search:
    """One epoch of a search method's iterations over paired D_t/D_v batches (or the whole training set)."""

    def __init__(self, problem: NetProblem, state: SearchState, method, *, loader_t, loader_v, loader_whole,
                 n_iter: int, epochs: int, optim_w, optim_y, optim_arch, channels_last: bool, cuda_graph: bool):
        self.problem, self.state, self.method = problem, state, method
        self.loader_t, self.loader_v, self.loader_whole = loader_t, loader_v, loader_whole
        self.n_iter, self.channels_last = n_iter, channels_last
        self.lr_w = schedule_fn(optim_w, n_iter, epochs)
        self.lr_y = schedule_fn(optim_y or optim_w, n_iter, epochs)
        scheduled = optim_arch is not None and optim_arch.schedule != "constant"
        self.lr_arch = schedule_fn(optim_arch, n_iter, epochs) if scheduled else None
        if method.data == "whole":
            def run_step(x, y):
                method.step(problem, state, (x, y), None)
        else:
            def run_step(xt, yt, xv, yv):
                method.step(problem, state, (xt, yt), (xv, yv))

        def drop_grads() -> None:
            # as in PyTorch's whole-network capture recipe: gradients from the warm-up must not be freed mid-capture
            for t in [*state.w.values(), *(state.y.values() if state.y is not None else ()), *problem.arch]:
                t.grad = None

        self.graphed = GraphedStep(run_step, enabled=cuda_graph and problem.device.type == "cuda",
                                   name=f"the {method.name} search step", setting="search.cuda_graph",
                                   before_capture=drop_grads)

    def _pairs(self) -> Iterable:
        device, cl, task = self.problem.device, self.channels_last, self.problem.task
        if self.method.data == "whole":
            return ((b, None) for b in batches_on(self.loader_whole, device, cl, task))
        return zip(batches_on(self.loader_t, device, cl, task), batches_on(self.loader_v, device, cl, task),
                   strict=False)

    def run_epoch(self, epoch: int, ticker) -> dict:
        state, problem = self.state, self.problem
        problem.model.train()
        images = 0
        for i, (batch_t, batch_v) in enumerate(self._pairs()):
            step = epoch * self.n_iter + i
            state.opt_w.set_lr(self.lr_w(step))
            if state.opt_y is not None:
                state.opt_y.set_lr(self.lr_y(step))
            if self.lr_arch is not None:
                state.optim_arch.set_lr(self.lr_arch(step))
            self.graphed(*batch_t, *(batch_v if batch_v is not None else ()))
            count = problem.task.count
            images += count(batch_t[1]) + (count(batch_v[1]) if batch_v is not None else 0)
            ticker.step(i)
        if dist.active():  # the same running statistics and image count on every rank
            dist.sync_buffers_([*state.w_buffers.values(), *(state.y_buffers or {}).values()])
            images = dist.sum_int(images)
        metrics = problem.read()  # one sync per epoch
        alphas = torch.cat([a.detach().abs().flatten() for a in problem.arch])
        out = {"method": self.method.name, "lr": state.opt_w.param_groups[0]["lr"],
               "cuda_graph": self.graphed.captured, **metrics, "images": images,
               "alpha_mean": alphas.mean().item(), "alpha_zero": (alphas == 0).float().mean().item()}
        if self.graphed.error:
            out["cuda_graph_error"] = self.graphed.error
        return out

    def watched(self) -> list[torch.Tensor]:
        state = self.state
        ws = [*state.w.values(), *(state.y.values() if state.y is not None else ())]
        return [t.detach() for t in ws if t.is_floating_point()]

    def state_dict(self) -> dict:
        return search_state_dict(self.problem, self.state)

    def load_state_dict(self, ckpt: dict) -> None:
        load_search_state(self.problem, self.state, ckpt)


def search_state_dict(problem: NetProblem, state: SearchState) -> dict:
    """What a search has learned and will resume from: w (and y) with their buffers, α, the three optimizers'
    states and, with `search.score: grad`, the importance summed so far (tensors, not copies)."""
    out = {"w": {k: v.detach() for k, v in state.w.items()}, "w_buffers": state.w_buffers,
           "arch": [a.detach() for a in problem.arch], "opt_w": state.opt_w.state_dict(),
           "optim_arch": state.optim_arch.state_dict()}
    if state.y is not None:
        out.update(y={k: v.detach() for k, v in state.y.items()}, y_buffers=state.y_buffers,
                   opt_y=state.opt_y.state_dict())
    importance = getattr(problem, "importance", None)
    if importance is not None:
        out["importance"] = [t.detach() for t in importance]
    return out


@torch.no_grad()
def load_search_state(problem: NetProblem, state: SearchState, ckpt: dict) -> None:
    """Copy `search_state_dict`'s content back into `problem` and `state`, in place."""
    torch._foreach_copy_(list(state.w.values()), [ckpt["w"][k] for k in state.w])
    for k, v in state.w_buffers.items():
        v.copy_(ckpt["w_buffers"][k])
    torch._foreach_copy_(problem.arch, ckpt["arch"])
    state.opt_w.load_state_dict(ckpt["opt_w"])
    state.optim_arch.load_state_dict(ckpt["optim_arch"])
    if state.y is not None:
        torch._foreach_copy_(list(state.y.values()), [ckpt["y"][k] for k in state.y])
        for k, v in state.y_buffers.items():
            v.copy_(ckpt["y_buffers"][k])
        state.opt_y.load_state_dict(ckpt["opt_y"])
    importance = getattr(problem, "importance", None)
    if importance is not None and "importance" in ckpt:
        torch._foreach_copy_(importance, ckpt["importance"])


def run_search(
    problem: NetProblem,
    state: SearchState,
    method: str,
    *,
    epochs: int,
    optim_w,
    optim_y=None,
    optim_arch=None,
    loader_t: Iterable | None = None,
    loader_v: Iterable | None = None,
    loader_whole: Iterable | None = None,
    channels_last: bool = False,
    run_dir: str | None = None,
    phase: str = "search",
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    callbacks: Iterable[Callback] = (),
    cuda_graph: bool = False,
) -> PhaseResult:
    """Run `epochs` epochs of search `method`; an epoch is one pass over D_t (paired with D_v) or the whole set.

    Args:
        problem: the loss of the net under given weights (a `NetProblem`); α are `problem.arch`.
        state: w (and y), their buffers and the three optimizers, from `search.problem.make_state`.
        method: a registered search method (`slimrarts.methods.list_methods("search")`).
        epochs: the number of epochs.
        optim_w, optim_y, optim_arch: the `OptimConfig`s whose schedules set the learning rates of w, y (default:
            w's) and α (only when `optim_arch.schedule` is not `constant`) per iteration.
        loader_t, loader_v: the halves D_t and D_v (methods with `data == "split"`).
        loader_whole: the whole training set (methods with `data == "whole"`).
        channels_last: give the batches channels-last memory.
        run_dir, phase, resume, progress, log_every, callbacks: as in `slimrarts.engine.fit`.
        cuda_graph: capture one iteration in a CUDA graph (CUDA only).

    Returns:
        A `PhaseResult`: per-epoch `history` (losses/accuracies on D_t and D_v, α statistics), `train_s`,
        `wall_s`, `images_per_s`.

    Raises:
        ValueError: an unknown method, a missing loader, or loaders without batches.
        DivergenceError: a loss, weight or α became non-finite (the epoch is not saved; the last checkpoint stays).

    In a process group (torchrun) each rank steps on its shard of every batch; every gradient a method takes of a
    data loss is averaged across the ranks before its step (`search.base.grads_of`), so w, y and α stay the same on
    every rank; running statistics are averaged at each epoch's end.

    Example:
        >>> problem = NetProblem(model, gates.alphas)  # doctest: +SKIP
        >>> state = make_state(model, gates.alphas, "rarts", optim_w=OptimConfig(), optim_arch=ArchOptimConfig())
        >>> run_search(problem, state, "rarts", epochs=1, optim_w=OptimConfig(), loader_t=lt, loader_v=lv)
    """
    info = get_method(method)
    if info.step is None:
        raise InputError(f"method {method!r} is a {info.kind}, not a search algorithm: it has no search step")
    if info.data == "whole" and loader_whole is None:
        raise InputError(f"search method {method!r} trains on the whole training set: pass loader_whole")
    if info.data == "split" and (loader_t is None or loader_v is None):
        raise InputError(f"search method {method!r} needs both halves: pass loader_t and loader_v")
    callbacks = list(callbacks)
    if cuda_graph and dist.active() and problem.device.type == "cuda":
        raise InputError("search.cuda_graph: capturing the search step of several processes in a CUDA graph is not "
                         "supported yet; set it to false under torchrun")
    n_iter = len(loader_whole) if info.data == "whole" else min(len(loader_t), len(loader_v))
    if n_iter == 0:
        raise InputError("the search loaders yield no batches (batch size larger than a half of the data?)")
    search = _Search(problem, state, info, loader_t=loader_t, loader_v=loader_v, loader_whole=loader_whole,
                     n_iter=n_iter, epochs=epochs, optim_w=optim_w, optim_y=optim_y, optim_arch=optim_arch,
                     channels_last=channels_last, cuda_graph=cuda_graph)
    loop_state = LoopState(phase=phase, model=problem.model, extra={"problem": problem, "search": state})
    return run_epochs(search, name=phase, epochs=epochs, steps_per_epoch=n_iter, device=problem.device,
                      loaders=[loader_t, loader_v, loader_whole], run_dir=run_dir, resume=resume, progress=progress,
                      description=f"{phase} ({method})", log_every=log_every, callbacks=callbacks, state=loop_state,
                      config_key="search")


def state_from_section(problem: NetProblem, section) -> SearchState:
    """The search state (w, y, the three optimizers) over `problem` for a recipe's `search` section."""
    s = section
    return make_state(problem.model, problem.arch, s.method, optim_w=s.optim, optim_y=s.optim_y,
                      optim_arch=s.optim_arch, lam=s.lam, beta=s.beta, xi=s.xi, grad_clip=s.grad_clip)


def search_from_section(problem: NetProblem, section, loaders, *, run_dir: str | None = None, resume: bool = False,
                        progress: bool = True, callbacks: Iterable[Callback] = (),
                        state: SearchState | None = None) -> tuple[SearchState, PhaseResult]:
    """Build the search state over `problem` from a recipe's `search` section and run it: the one way the width
    search (`api.search_width`) and the cell search (`nas.search_topology`) run.

    `section` is a width or cell recipe's `search` (method, epochs, lam, beta, xi, grad_clip, the optimizers `optim`,
    `optim_y` and `optim_arch`, channels_last, log_every, cuda_graph); `loaders` has `search_t`, `search_v` and `train`
    (read by methods that train on the whole set). `state`: one made before (`state_from_section`), else a new
    one. Returns the state (w, y, optimizers) and the phase's result.
    """
    s = section
    if state is None:
        state = state_from_section(problem, s)
    whole = get_method(s.method).data == "whole"
    result = run_search(problem, state, s.method, epochs=s.epochs, optim_w=s.optim, optim_y=s.optim_y,
                        optim_arch=s.optim_arch, loader_t=loaders.search_t, loader_v=loaders.search_v,
                        loader_whole=loaders.train if whole else None, channels_last=s.channels_last,
                        run_dir=run_dir, resume=resume, progress=progress, log_every=s.log_every,
                        callbacks=callbacks, cuda_graph=s.cuda_graph)
    return state, result
