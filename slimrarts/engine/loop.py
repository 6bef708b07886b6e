"""fit() and evaluate(): epochs, schedule, checkpoints, metrics.jsonl and exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from .optim import SGD
from .progress import make_progress
from .schedule import lr_at
from .step import TrainStep, autocast, batches_on

__all__ = ["FitResult", "fit", "evaluate", "resolve_device", "set_loader_epoch", "append_metrics", "build_sgd",
           "resume_checkpoint"]


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else MPS, else CPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} was asked for but CUDA is not available here; use device=cpu or auto")
    return device


def set_loader_epoch(loader, epoch: int) -> None:
    """Tell a loader (ours, or a DataLoader with a distributed-style sampler) which epoch starts."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return


def append_metrics(run_dir: str | os.PathLike | None, record: dict) -> None:
    """Append one JSON line to `run_dir/metrics.jsonl`."""
    if run_dir is None:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _drop_metrics_after(run_dir: Path, phase: str, epoch: int) -> None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if not (json.loads(ln).get("phase") == phase and json.loads(ln).get("epoch", -1) > epoch)]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)


def resume_checkpoint(run_dir, phase: str, device: torch.device, resume: bool) -> dict | None:
    """The checkpoint of `phase` in `run_dir` to continue from (RNG restored, metrics lines after it dropped), or None.

    Without a checkpoint, lines of this phase left by an epoch whose checkpoint never landed are dropped too.
    """
    if not resume or run_dir is None:
        return None
    path = Path(run_dir) / "checkpoints" / f"{phase}.pt"
    if not path.exists():
        _drop_metrics_after(Path(run_dir), phase, -1)
        return None
    ckpt = load_checkpoint(path, map_location=device)
    set_rng_state(ckpt["rng"])
    _drop_metrics_after(Path(run_dir), phase, ckpt["epoch"])
    return ckpt


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Iterable, *, device: torch.device | str | None = None,
             amp: str = "none", channels_last: bool = False) -> dict:
    """Mean cross-entropy and top-1 accuracy of `model` over `loader` (eval mode; one host sync)."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in batches_on(loader, device, channels_last):
        with autocast(device, amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


def build_sgd(params, optim_cfg) -> SGD:
    """The weights' SGD from an `OptimConfig`."""
    return SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
               nesterov=optim_cfg.nesterov)


def _lr_fn(optim_cfg, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        return lr_at(step, base_lr=optim_cfg.lr, steps_per_epoch=steps_per_epoch, epochs=epochs,
                     schedule=optim_cfg.schedule, milestones=optim_cfg.milestones, gamma=optim_cfg.gamma,
                     warmup_epochs=optim_cfg.warmup_epochs, min_lr=optim_cfg.min_lr)
    return fn


@dataclasses.dataclass
class FitResult:
    """What a training phase did: per-epoch history and the final epoch's figures."""

    history: list[dict]
    wall_s: float
    train_s: float

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def images_per_s(self) -> float:
        imgs = sum(h["train_n"] for h in self.history)
        return imgs / self.train_s if self.train_s > 0 else float("nan")


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
    after_backward: Callable[[], None] | None = None,
    callbacks: Iterable[Callable[[int, dict], None]] = (),
    eval_every: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
) -> FitResult:
    """Train `model` for `cfg.epochs` epochs (a `TrainConfig`), checkpointing each epoch into `run_dir`.

    With `resume=True` and a checkpoint of this `phase` in `run_dir`, training continues after its last
    epoch and ends with the same weights as an uninterrupted run. `after_backward` runs between backward and the
    optimizer step (e.g. a sparsity subgradient); `loss_fn(output, target)` replaces cross-entropy (e.g. with an
    auxiliary head); `on_epoch_start(epoch)` runs before each epoch (e.g. a drop-path schedule). Test accuracy is
    logged per epoch for the record only.
    """
    device = resolve_device(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = optimizer if optimizer is not None else build_sgd(model.parameters(), cfg.optim)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (is the batch size larger than the data set?)")
    lr_fn = _lr_fn(cfg.optim, steps_per_epoch, cfg.epochs)
    ckpt_path = Path(run_dir) / "checkpoints" / f"{phase}.pt" if run_dir is not None else None
    history: list[dict] = []
    start_epoch, prior_wall, prior_train = 0, 0.0, 0.0
    ckpt = resume_checkpoint(run_dir, phase, device, resume)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        history = json.loads(ckpt["history"])
        start_epoch = ckpt["epoch"] + 1
        prior_wall, prior_train = ckpt["wall_s"], ckpt["train_s"]
    step_fn = TrainStep(model, opt, device=device, amp=cfg.amp, after_backward=after_backward,
                        cuda_graph=cfg.cuda_graph, loss_fn=loss_fn)
    t_start = time.perf_counter()
    train_s = prior_train
    with make_progress(progress) as bar:
        task = bar.add_task(phase, total=cfg.epochs * steps_per_epoch, completed=start_epoch * steps_per_epoch,
                            info="")
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            set_loader_epoch(train_loader, epoch)
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(batches_on(train_loader, device, cfg.channels_last)):
                opt.set_lr(lr_fn(epoch * steps_per_epoch + i))
                step_fn(x, y)
                bar.advance(task)
                if progress and (i + 1) % cfg.log_every == 0:
                    loss, acc = step_fn.peek()
                    bar.update(task, info=f"ep {epoch + 1} loss {loss:.3f} acc {acc:.3f}")
            train = step_fn.read()  # one sync per epoch
            dt = time.perf_counter() - t0
            train_s += dt
            record = {"phase": phase, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": train["loss"],
                      "train_acc": train["acc"], "train_n": train["n"], "epoch_s": dt,
                      "images_per_s": train["n"] / dt, "cuda_graph": step_fn.captured}
            if step_fn.capture_error:
                record["cuda_graph_error"] = step_fn.capture_error
            if test_loader is not None and ((epoch + 1) % eval_every == 0 or epoch == cfg.epochs - 1):
                test = evaluate(model, test_loader, device=device, amp=cfg.amp, channels_last=cfg.channels_last)
                record.update(test_loss=test["loss"], test_acc=test["acc"])
            history.append(record)
            info = f"ep {epoch + 1} loss {train['loss']:.3f} acc {train['acc']:.3f} {record['images_per_s']:.0f} img/s"
            if "test_acc" in record:
                info += f" test {record['test_acc']:.3f}"
            bar.update(task, info=info)
            if ckpt_path is not None:  # the line first: a resume drops lines whose checkpoint never landed
                append_metrics(run_dir, record)
                save_atomic({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "rng": rng_state(), "history": json.dumps(history),
                             "wall_s": prior_wall + time.perf_counter() - t_start, "train_s": train_s}, ckpt_path)
            for cb in callbacks:
                cb(epoch, record)
    return FitResult(history=history, wall_s=prior_wall + time.perf_counter() - t_start, train_s=train_s)
