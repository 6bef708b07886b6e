"""The search epoch loop: pairs D_t/D_v batches, runs a method's step, schedules, checkpoints, exact resume."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable

import torch

from ..engine.graph import GraphedStep
from ..engine.checkpoint import rng_state, save_atomic
from ..engine.loop import _lr_fn, append_metrics, resume_checkpoint, set_loader_epoch
from ..engine.progress import make_progress
from ..engine.step import batches_on
from .base import SearchState, get_search
from .problem import NetProblem

__all__ = ["SearchResult", "run_search"]


@dataclasses.dataclass
class SearchResult:
    """Per-epoch history of a search and its time."""

    history: list[dict]
    wall_s: float
    search_s: float

    @property
    def images_per_s(self) -> float:
        n = sum(h["images"] for h in self.history)
        return n / self.search_s if self.search_s > 0 else float("nan")


def _state_payload(problem: NetProblem, state: SearchState) -> dict:
    out = {"w": {k: v.detach() for k, v in state.w.items()}, "w_buffers": state.w_buffers,
           "arch": [a.detach() for a in problem.arch], "opt_w": state.opt_w.state_dict(),
           "opt_arch": state.opt_arch.state_dict()}
    if state.y is not None:
        out.update(y={k: v.detach() for k, v in state.y.items()}, y_buffers=state.y_buffers,
                   opt_y=state.opt_y.state_dict())
    return out


@torch.no_grad()
def _load_payload(problem: NetProblem, state: SearchState, ckpt: dict) -> None:
    torch._foreach_copy_(list(state.w.values()), [ckpt["w"][k] for k in state.w])
    for k, v in state.w_buffers.items():
        v.copy_(ckpt["w_buffers"][k])
    torch._foreach_copy_(problem.arch, ckpt["arch"])
    state.opt_w.load_state_dict(ckpt["opt_w"])
    state.opt_arch.load_state_dict(ckpt["opt_arch"])
    if state.y is not None:
        torch._foreach_copy_(list(state.y.values()), [ckpt["y"][k] for k in state.y])
        for k, v in state.y_buffers.items():
            v.copy_(ckpt["y_buffers"][k])
        state.opt_y.load_state_dict(ckpt["opt_y"])


def _pairs(method, loader_t, loader_v, loader_whole, device, channels_last) -> Iterable:
    if method.data == "whole":
        return ((b, None) for b in batches_on(loader_whole, device, channels_last))
    return zip(batches_on(loader_t, device, channels_last), batches_on(loader_v, device, channels_last))


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
    on_epoch_end=None,
    cuda_graph: bool = False,
) -> SearchResult:
    """Run `epochs` epochs of search `method`; an epoch is one pass over D_t (paired with D_v) or the whole set.

    The learning rates of the weights (and of α, given `optim_arch` with a schedule) follow their schedules per
    iteration. With `run_dir`, the state is checkpointed each epoch and `resume=True` continues exactly where the
    last checkpoint ended.
    """
    spec = get_search(method)
    if spec.data == "whole" and loader_whole is None:
        raise ValueError(f"search method {method!r} trains on the whole training set: pass loader_whole")
    if spec.data == "split" and (loader_t is None or loader_v is None):
        raise ValueError(f"search method {method!r} needs both halves: pass loader_t and loader_v")
    device = problem.device
    n_iter = len(loader_whole) if spec.data == "whole" else min(len(loader_t), len(loader_v))
    if n_iter == 0:
        raise ValueError("the search loaders yield no batches (batch size larger than a half of the data?)")
    lr_w = _lr_fn(optim_w, n_iter, epochs)
    lr_y = _lr_fn(optim_y or optim_w, n_iter, epochs)
    scheduled_arch = optim_arch is not None and optim_arch.schedule != "constant"
    lr_arch = _lr_fn(optim_arch, n_iter, epochs) if scheduled_arch else None
    ckpt_path = Path(run_dir) / "checkpoints" / f"{phase}.pt" if run_dir is not None else None
    history: list[dict] = []
    start, prior_wall, search_s = 0, 0.0, 0.0
    ckpt = resume_checkpoint(run_dir, phase, device, resume)
    if ckpt is not None:
        _load_payload(problem, state, ckpt)
        history = json.loads(ckpt["history"])
        start, prior_wall, search_s = ckpt["epoch"] + 1, ckpt["wall_s"], ckpt["search_s"]
    if spec.data == "whole":
        def run_step(x, y):
            spec.step(problem, state, (x, y), None)
    else:
        def run_step(xt, yt, xv, yv):
            spec.step(problem, state, (xt, yt), (xv, yv))
    def drop_grads() -> None:
        # as in PyTorch's whole-network capture recipe: gradients from the warm-up must not be freed mid-capture
        for t in [*state.w.values(), *(state.y.values() if state.y is not None else ()), *problem.arch]:
            t.grad = None

    graphed = GraphedStep(run_step, enabled=cuda_graph and device.type == "cuda", name=f"the {method} search step",
                          setting="search.cuda_graph", before_capture=drop_grads)
    t_start = time.perf_counter()
    problem.model.train()
    with make_progress(progress) as bar:
        task = bar.add_task(f"{phase} ({method})", total=epochs * n_iter, completed=start * n_iter, info="")
        for epoch in range(start, epochs):
            for loader in (loader_t, loader_v, loader_whole):
                if loader is not None:
                    set_loader_epoch(loader, epoch)
            t0 = time.perf_counter()
            images = 0
            for i, (batch_t, batch_v) in enumerate(_pairs(spec, loader_t, loader_v, loader_whole, device,
                                                          channels_last)):
                step = epoch * n_iter + i
                state.opt_w.set_lr(lr_w(step))
                if state.opt_y is not None:
                    state.opt_y.set_lr(lr_y(step))
                if lr_arch is not None:
                    state.opt_arch.set_lr(lr_arch(step))
                graphed(*batch_t, *(batch_v if batch_v is not None else ()))
                images += batch_t[1].shape[0] + (batch_v[1].shape[0] if batch_v is not None else 0)
                bar.advance(task)
                if progress and (i + 1) % log_every == 0:
                    bar.update(task, info=f"ep {epoch + 1} it {i + 1}/{n_iter}")
            metrics = problem.read()  # one sync per epoch
            dt = time.perf_counter() - t0
            search_s += dt
            alphas = torch.cat([a.detach().abs().flatten() for a in problem.arch])
            record = {"phase": phase, "method": method, "epoch": epoch, "lr": state.opt_w.param_groups[0]["lr"],
                      "cuda_graph": graphed.captured,
                      **metrics, "epoch_s": dt, "images": images, "images_per_s": images / dt,
                      "alpha_mean": alphas.mean().item(), "alpha_zero": (alphas == 0).float().mean().item()}
            if graphed.error:
                record["cuda_graph_error"] = graphed.error
            history.append(record)
            bar.update(task, info=" ".join(f"{k} {record[k]:.3f}" for k in ("t_loss", "t_acc", "v_acc") if k in record))
            if ckpt_path is not None:  # the line first: a resume drops lines whose checkpoint never landed
                append_metrics(run_dir, record)
                save_atomic({"epoch": epoch, **_state_payload(problem, state), "rng": rng_state(),
                             "history": json.dumps(history), "wall_s": prior_wall + time.perf_counter() - t_start,
                             "search_s": search_s}, ckpt_path)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    return SearchResult(history=history, wall_s=prior_wall + time.perf_counter() - t_start, search_s=search_s)
