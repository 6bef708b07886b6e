"""Checks of a model and its data before any training, so bad input fails in a second with a message naming the
problem instead of deep inside torch (or, on CUDA, as an unrecoverable device assert). The model's input/output
adapters they read through are `slimrarts.models.io`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .engine import dist
from .engine.task import CLASSIFICATION, Task
from .errors import DataError, InputError, InputTypeError
from .models.io import OutputError, logits_of
from .modes import evaluating

__all__ = ["CheckedLoader", "check_data", "check_first_batches", "check_model", "check_processes", "finite_model",
           "frozen_layers", "model_outputs"]


def check_model(model: nn.Module) -> None:
    """The model can be trained in fp32 here: real (not meta) floating parameters, fp32, some trainable."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InputTypeError(f"the model is wrapped in {type(model).__name__}: pass the module inside it "
                             "(model.module); slimrarts adds and removes channels, which a wrapper's replicas and "
                             "buckets do not follow. For several GPUs, run slimrarts under torchrun")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise InputTypeError("the model is a torch.compile'd module: pass the original one (model._orig_mod); a "
                             "compiled graph is specialised to the widths slimrarts changes. Compile the slim "
                             "model afterwards")
    compiled = [n for n, m in model.named_modules()
                if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")]
    if compiled:
        name = compiled[0]
        raise InputTypeError(f"model.{name} is a torch.compile'd module: put the original back (model.{name} = "
                             f"model.{name}._orig_mod) before pruning; a compiled graph is specialised to the widths "
                             "slimrarts changes, and its channels cannot be traced. Compile the slim model afterwards")
    params = list(model.parameters())
    if not params:
        raise InputError("the model has no parameters: there is nothing to prune or train")
    if any(p.is_meta for p in params):
        raise InputError("the model's parameters are on the meta device (not materialised); build it on a real device "
                         "or call model.to_empty(device=...) and load its weights first")
    odd = sorted({str(p.dtype) for p in params if p.is_floating_point() and p.dtype != torch.float32})
    if odd:
        raise InputError(f"the model's parameters are {', '.join(odd)}; slimrarts keeps fp32 weights (use the amp=bf16 "
                         "settings for mixed precision): call model.float() first")
    if not any(p.requires_grad for p in params):
        raise InputError("every parameter of the model is frozen (requires_grad=False): slimrarts trains the weights "
                         "it prunes; unfreeze them with model.requires_grad_(True), at least for the layers to prune")


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    return None


@torch.no_grad()
def model_outputs(model: nn.Module, x: torch.Tensor, task: Task = CLASSIFICATION) -> int | None:
    """Run `model` on the batch `x` in eval mode and return its number of outputs (classes; None where `task` does
    not check labels against the model); errors say why the model cannot read the data."""
    if not x.is_floating_point():
        raise InputTypeError(f"the data's images are {x.dtype}; the model needs floating-point inputs (normalise "
                             "them, e.g. x.float() / 255, in the dataset's transform)")
    try:
        with evaluating(model):
            out = model(*task.eval_args(x))
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means the model cannot read these batches
        expects = _first_conv_channels(model)
        hint = f" (its first convolution reads {expects} channels)" if expects is not None else ""
        raise InputError(f"the model cannot read the data's batches of shape {tuple(x.shape)}{hint}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    if task.name == "classification":
        return task.outputs(logits_of(out))
    n = task.outputs(out)
    classes_of = getattr(task, "classes_of", None)  # a task whose output does not say it (detection) reads the model
    return classes_of(model) if n is None and callable(classes_of) else n


def _label_error(where: str, label: int, num_classes: int, batch: int | None = None,
                 task: Task = CLASSIFICATION) -> ValueError:
    at = f"the {where} loader's batch {batch}: " if batch is not None else f"the {where} loader: "
    low = _min_label(task)
    fix = f"labels must be >= {low}" if label < low else f"give the model num_classes={label + 1} or more"
    if label < low and low == 1 and task.name == "detection":
        fix += " (0 is the background class of torchvision's detection models: number the object classes from 1)"
    ignore = getattr(task, "ignore_index", None)
    also = f" (masks may also hold the ignore index {ignore})" if ignore is not None else ""
    return InputError(f"{at}label {label} is outside [{low}, {num_classes}){also} (the model has {num_classes} "
                      f"outputs); {fix}, or fix the labels")


def _min_label(task: Task) -> int:
    """The smallest class index a target may hold (detection: 1, the background being 0)."""
    return int(getattr(task, "min_label", 0))


def _nonfinite_error(where: str, batch: int | None = None) -> DataError:
    at = f"the {where} loader's batch {batch}" if batch is not None else f"the {where} loader's first batch"
    return DataError(f"{at} has non-finite input values (NaN or inf): this is a data problem, not a learning rate "
                     "one; check the dataset's files and its transform (a normalisation dividing by a zero std?)")


class CheckedLoader:
    """A user's loader whose batches are checked as they stream — labels in range and finite inputs (on the CPU,
    before the batch moves to the device, so no sync and no device assert) — failing at the first bad batch with
    its index."""

    def __init__(self, loader, num_classes: int | None, where: str, task: Task = CLASSIFICATION):
        self.loader, self.num_classes, self.where, self.task = loader, num_classes, where, task

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.task.check(batch, self.where)
            x, y = batch[0], batch[1]
            bounds = self.task.label_bounds(y) if self.num_classes is not None else None
            if bounds is not None:
                lo, hi = bounds
                if lo < _min_label(self.task) or hi >= self.num_classes:
                    raise _label_error(self.where, lo if lo < _min_label(self.task) else hi, self.num_classes, i,
                                       self.task)
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.is_floating_point():
                if not torch.isfinite(x).all():
                    raise _nonfinite_error(self.where, i)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # dataset, batch_size, sampler, set_epoch, ... of the wrapped loader
        return getattr(self.loader, name)


def _size(loader) -> int | None:
    n = getattr(loader, "num_samples", None)
    if n is None:
        dataset = getattr(loader, "dataset", None)
        n = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    return n


def _describe_loader(loader) -> str:
    parts = []
    n = _size(loader)
    if n is not None:
        parts.append(f"{n} samples")
    for attr in ("batch_size", "drop_last"):
        if getattr(loader, attr, None) is not None:
            parts.append(f"{attr}={getattr(loader, attr)}")
    return ", ".join(parts)


def check_first_batches(loaders, task: Task = CLASSIFICATION,
                        which: tuple[str, ...] = ("train", "search_t", "search_v"), *, read: bool = True) -> None:
    """One look at the first batch of each user loader of `which` (the library's own, which know their label
    range, are trusted): it has batches, they read as `task`'s and their inputs are finite. Fails naming the
    loader. With `read=False` only the number of batches is checked (the test set is not read before its first
    evaluation; `CheckedLoader` checks its first batch then)."""
    for where in which:
        loader = getattr(loaders, where)
        if getattr(loader, "label_range", None) is not None:
            continue
        try:
            n = len(loader)
        except TypeError:
            raise DataError(f"the {where} loader has no length (an IterableDataset without __len__?): slimrarts needs "
                            "the batches per epoch for its schedules; give the dataset a __len__, or use a map-style "
                            "Dataset") from None
        if n == 0:
            raise DataError(f"the {where} loader yields no batches ({_describe_loader(loader)}): with drop_last=True "
                            "a set smaller than one batch gives none; lower the batch size or set drop_last=False")
        if not read:
            continue
        batch = next(iter(loader), None)
        if batch is None:
            raise DataError(f"the {where} loader yields no batches ({_describe_loader(loader)})")
        task.check(batch, where)
        images = batch[0] if isinstance(batch[0], (list, tuple)) else [batch[0]]
        if any(x.is_floating_point() and not bool(torch.isfinite(x).all()) for x in images):
            raise _nonfinite_error(where)


def check_data(loaders, num_classes: int | None, task: Task = CLASSIFICATION):
    """Labels in range of the model's `num_classes` outputs (None: the task does not check them; all labels at once
    for the library's loaders, per batch as they stream for other loaders, which are wrapped in `CheckedLoader`),
    and enough training samples for two halves.
    Returns the loaders with the wrappers in place."""
    for where in ("train", "search_t", "search_v"):
        n = _size(getattr(loaders, where))
        if n is not None and n < 2:
            what = "training set" if where == "train" else f"search half {where} of the training set"
            raise InputError(f"the {what} has {n} sample(s); the search splits the training set into two halves and "
                             "each needs at least 2 (batch norm needs 2 per batch): give at least 4 training samples")
    replaced = {}
    for where in ("train", "test", "search_t", "search_v"):
        loader = getattr(loaders, where)
        label_range = getattr(loader, "label_range", None)
        if label_range is not None and num_classes is not None:
            lo, hi = label_range()
            if lo < _min_label(task) or hi >= num_classes:
                raise _label_error(where, lo if lo < _min_label(task) else hi, num_classes, task=task)
        elif not isinstance(loader, CheckedLoader):
            replaced[where] = CheckedLoader(loader, num_classes, where, task)
    for where, loader in replaced.items():
        setattr(loaders, where, loader)
    return loaders


@torch.no_grad()
def finite_model(model: nn.Module) -> bool:
    """Whether every floating parameter and buffer of `model` is finite (one host sync)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def frozen_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions and linear layers whose weight is frozen (left out of gating: they are not trained)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not m.weight.requires_grad]


def check_processes(recipe, device: torch.device, sections: tuple[str, ...] = ("search", "finetune", "train")) -> None:
    """Settings a run over several processes cannot honour, refused before any work (nothing to check in one
    process): `dist.sync_bn` off CUDA, and CUDA-graph capture in the recipe `sections` the command runs."""
    if dist.world_size() <= 1:
        return
    if recipe.dist.sync_bn and device.type != "cuda":
        raise InputError(f"dist.sync_bn=true synchronises batch statistics with SyncBatchNorm, which needs CUDA "
                         f"(NCCL); on {device.type} (gloo) there is none: set dist.sync_bn=false (each process then "
                         "normalises its share of the batch)")
    for name in sections:
        cfg = getattr(recipe, name, None)
        if cfg is not None and getattr(cfg, "cuda_graph", False) and device.type == "cuda":
            raise InputError(f"{name}.cuda_graph=true: capturing the step of several processes in a CUDA graph is not "
                             "supported yet; set it to false under torchrun")
