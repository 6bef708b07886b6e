"""fit() and evaluate(): supervised training as a phase of the one epoch loop (`engine.epochs.run_epochs`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from ..errors import InputError
from ..modes import evaluating
from . import dist
from .callbacks import Callback, Event, LoopState, fire
from .device import resolve_device
from .epochs import PhaseResult, run_epochs, set_loader_epoch
from .optim import SGD, build_optimizer
from .rundir import RunDir
from .schedule import schedule_fn
from .step import TrainStep, autocast, batches_on
from .task import CLASSIFICATION, Task

__all__ = ["FitResult", "append_metrics", "build_sgd", "evaluate", "fit", "resolve_device", "set_loader_epoch"]

FitResult = PhaseResult  # the result of fit(): history, wall_s, train_s, final, images_per_s


def append_metrics(run_dir: str | os.PathLike | None, record: dict) -> None:
    """Append one JSON line to `run_dir/metrics.jsonl` (see `RunDir.append_metrics`)."""
    if run_dir is not None:
        RunDir(run_dir).append_metrics(record)


def build_sgd(params, optim_cfg) -> SGD:
    """The weights' SGD from an `OptimConfig` (see `engine.optim.build_optimizer`)."""
    return build_optimizer(params, optim_cfg)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, *, device: torch.device | str | None = None,
             amp: str = "none", channels_last: bool = False, task: Task = CLASSIFICATION) -> dict:
    """Mean loss (None where the task's eval-mode output has none) and the metrics of `task` (classification:
    top-1 accuracy `acc`; segmentation: `miou`, `pixel_acc`; detection: `map`, `map_50`) of `model` over `loader`
    (eval mode; one host sync), plus `n`, the samples.

    In a process group each rank evaluates its shard of the loader and the sums are added up (one all-reduce), so
    every rank returns the figures of the whole set."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    meter = task.meter(device)
    n = 0
    with evaluating(model):
        for x, y in batches_on(loader, device, channels_last, task):
            with autocast(device, amp):
                out = model(*task.eval_args(x))
            if task.eval_loss:
                loss_sum += task.loss(out, y, reduction="sum").double()
            meter.update(out, y)
            n += task.count(y)
    sums = torch.stack([loss_sum, torch.tensor(float(n), device=device, dtype=torch.float64)])
    if dist.active():
        dist.all_reduce_([sums], "sum")
    total, count = sums.tolist()
    if count == 0:
        raise InputError("evaluate() got an empty loader")
    return {"loss": total / count if task.eval_loss else None, **meter.compute(), "n": int(count)}


class _Training:
    """One epoch of supervised training (the phase `fit` runs)."""

    def __init__(self, model, opt, step, train_loader, test_loader, cfg, device, eval_every, steps_per_epoch):
        self.model, self.opt, self.step, self.cfg, self.device = model, opt, step, cfg, device
        self.train_loader, self.test_loader, self.eval_every = train_loader, test_loader, eval_every
        self.steps_per_epoch = steps_per_epoch
        self.lr = schedule_fn(cfg.optim, steps_per_epoch, cfg.epochs)
        # whether a divergence message may advise the section's grad_clip (a cell-search train section has one)
        self.clips_gradients = hasattr(cfg, "grad_clip")

    def run_epoch(self, epoch: int, ticker) -> dict:
        self.model.train()
        metric = self.step.task.train_metric

        def peek() -> str:
            loss, value = self.step.peek()
            return f"ep {epoch + 1} loss {loss:.3f}" + (f" {metric} {value:.3f}" if metric else "")

        for i, (x, y) in enumerate(batches_on(self.train_loader, self.device, self.cfg.channels_last,
                                                 self.step.task)):
            self.opt.set_lr(self.lr(epoch * self.steps_per_epoch + i))
            self.step(x, y)
            ticker.step(i, peek)
        dist.sync_buffers_(self.model.buffers())  # every rank ends the epoch with the same running statistics
        train = self.step.read()  # one sync per epoch
        out = {"lr": self.opt.param_groups[0]["lr"], "train_loss": train["loss"]}
        if metric:
            out[f"train_{metric}"] = train["acc"]
        out.update(train_n=train["n"], images=train["n"], cuda_graph=self.step.captured)
        if self.step.capture_error:
            out["cuda_graph_error"] = self.step.capture_error
        return out

    def evaluate(self, epoch: int) -> dict:
        if self.test_loader is None or not ((epoch + 1) % self.eval_every == 0 or epoch == self.cfg.epochs - 1):
            return {}
        test = evaluate(self.model, self.test_loader, device=self.device, amp=self.cfg.amp, task=self.step.task,
                        channels_last=self.cfg.channels_last)
        return {f"test_{k}": v for k, v in test.items() if k != "n"}

    def watched(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters() if p.is_floating_point()]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])


def fit(
    model: torch.nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    *,
    cfg,
    device: torch.device | str = "auto",
    run_dir: str | os.PathLike | None = None,
    phase: str = "train",
    resume: bool = False,
    progress: bool = True,
    callbacks: Iterable[Callback] = (),
    eval_every: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable | None = None,
    task: Task = CLASSIFICATION,
    config_key: str | None = None,
) -> PhaseResult:
    """Train `model` for `cfg.epochs` epochs, checkpointing each epoch into `run_dir`.

    Args:
        model: the network; moved to `device` (and to channels-last memory with `cfg.channels_last`).
        train_loader: batches `(x, y)`: a `slimrarts.data.DeviceLoader` or any iterable such as a DataLoader.
        test_loader: evaluated every `eval_every` epochs and at the last, for the record only (it chooses nothing).
        cfg: a `TrainConfig` (epochs, optim, amp, channels_last, cuda_graph, log_every).
        device: `auto`, `cpu`, `cuda`, ... or a torch.device.
        run_dir: the run folder for `metrics.jsonl` and `checkpoints/<phase>.pt`; None writes nothing.
        phase: this phase's name in metrics lines and checkpoints.
        resume: continue after the last checkpoint of `phase` in `run_dir` (same result as an uninterrupted run).
        progress: show a progress bar.
        callbacks: `slimrarts.engine.Callback`s (e.g. `on(Event.AFTER_BACKWARD, fn)` for a subgradient,
            `on(Event.EPOCH_START, fn)` for a schedule); see `engine.callbacks`.
        eval_every: test-set evaluation period in epochs.
        optimizer: use this optimizer instead of the SGD of `cfg.optim`.
        loss_fn: `loss_fn(output, target)` instead of the task's loss (e.g. with an auxiliary head).
        task: how batches split, the loss and the metric (`engine.task`; default: classification).
        config_key: the recipe section `cfg` came from (named when the phase diverges); default: `phase`.

    Returns:
        A `PhaseResult` (`FitResult`): `history` (one metrics record per epoch), `final`, `train_s`, `wall_s`,
        `images_per_s`.

    In a process group (torchrun) the model trains inside `DistributedDataParallel`: each rank steps on its shard
    of every batch, gradients are averaged during backward (before `AFTER_BACKWARD` callbacks), running statistics
    are averaged at each epoch's end, and rank 0 alone writes.

    Raises:
        ValueError: the training loader yields no batches; `cfg.cuda_graph` on CUDA in a process group.
        DivergenceError: a loss or weight became non-finite (the epoch is not saved; the last checkpoint stays).

    Example:
        >>> cfg = TrainConfig(epochs=2, optim=OptimConfig(lr=0.1))  # doctest: +SKIP
        >>> fit(model, loaders.train, loaders.test, cfg=cfg, device="cpu").final["test_acc"]  # doctest: +SKIP
    """
    device = resolve_device(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    callbacks = list(callbacks)
    opt = optimizer if optimizer is not None else build_optimizer(model.parameters(), cfg.optim)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise InputError("the training loader yields no batches (is the batch size larger than the data set?)")
    state = LoopState(phase=phase, model=model)
    backward_hooks = [cb for cb in callbacks if cb.match(Event.AFTER_BACKWARD, state)]
    after = (lambda: fire(backward_hooks, Event.AFTER_BACKWARD, state)) if backward_hooks else None
    if dist.active() and cfg.cuda_graph and device.type == "cuda":
        raise InputError(f"{config_key or phase}.cuda_graph: capturing the training step of several processes in a "
                         "CUDA graph is not supported yet; set it to false under torchrun")
    step = TrainStep(dist.wrap_ddp(model, device), opt, device=device, amp=cfg.amp, after_backward=after,
                     cuda_graph=cfg.cuda_graph, loss_fn=loss_fn, task=task)
    training = _Training(model, opt, step, train_loader, test_loader, cfg, device, eval_every, steps_per_epoch)
    return run_epochs(training, name=phase, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, device=device,
                      loaders=[train_loader], run_dir=run_dir, resume=resume, progress=progress,
                      log_every=cfg.log_every, callbacks=callbacks, state=state, config_key=config_key or phase)
