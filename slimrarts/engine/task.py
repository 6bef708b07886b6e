"""The task a network learns, as every phase reads it: how a batch splits and moves, how the model is called, the
loss, and the metrics.

Training (`fit`, `TrainStep`), evaluation (`evaluate`), the search's losses (`search.problem.NetProblem`), the
baselines that read gradients, BN recalibration, the pre-flight checks and the pipeline (`prune()`) take a `Task`
instead of assuming cross-entropy and top-1 accuracy. Built in (`get_task(name)`):

- `classification` (the default): `(images, labels)` batches, cross-entropy, top-1 accuracy `acc`;
- `segmentation`: `(images, masks)` batches with masks `[batch, H, W]` of class indices (`ignore_index`, 255 by
  default, is left out of the loss and the metrics), per-pixel cross-entropy (plus `aux_weight` × that of an `aux`
  head, as torchvision's FCN and DeepLab have), mean IoU `miou` and pixel accuracy `pixel_acc`;
- `detection`: torchvision detection models (Faster R-CNN, RetinaNet, SSD): `(images, targets)` batches (lists;
  targets are dicts with `boxes` xyxy and `labels`), the sum of the model's loss dict in train mode, COCO mAP@[.5:.95]
  `map` and mAP@.5 `map_50` in eval mode through torchmetrics (the `tasks` extra), not a home-made mAP.

`CustomTask` (or `prune(..., loss_fn=, metric_fn=)`) puts a user's loss and metric on any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, InputError, InputTypeError, MissingExtraError

__all__ = ["CLASSIFICATION", "Classification", "CustomTask", "Detection", "Meter", "Segmentation", "Task",
           "get_task", "list_tasks"]


class Meter(Protocol):
    """Accumulates a task's evaluation metrics over batches; `compute` reads them (one host sync; in a process
    group, over every rank's batches)."""

    def update(self, out: Any, target: Any) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task(Protocol):
    """What the phases need to know about the learning problem."""

    name: str
    metric: str  # the key of the headline metric in reports and metrics lines ("acc", "miou", "map")
    higher_is_better: bool
    train_metric: str | None  # the running metric of training steps (`running`), or None
    eval_loss: bool  # whether the model's eval-mode output has a loss (a detection model's has not)

    def split(self, batch: Any) -> tuple[Any, Any]:
        """`(inputs, target)` of one batch as a loader yields it."""
        ...

    def to(self, x: Any, target: Any, device: torch.device) -> tuple[Any, Any]:
        """The batch on `device` (non-blocking)."""
        ...

    def train_args(self, x: Any, target: Any) -> tuple:
        """The positional arguments of the model in train mode (a detection model also takes the targets)."""
        ...

    def eval_args(self, x: Any) -> tuple:
        """The positional arguments of the model in eval mode."""
        ...

    def loss(self, out: Any, target: Any, reduction: str = "mean") -> torch.Tensor:
        """The training loss of the model's output (fp32); `sum` is the mean per sample times the samples."""
        ...

    def running(self, out: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Numerator and denominator of the training steps' running metric on this batch (0-d device tensors, no
        host sync), or None."""
        ...

    def count(self, target: Any) -> int:
        """The samples in this batch (host side, no sync)."""
        ...

    def meter(self, device: torch.device) -> Meter:
        """A fresh accumulator of the evaluation metrics (the headline `metric` among them)."""
        ...

    def example(self, x: Any) -> torch.Tensor:
        """A batch tensor of inputs to trace the model with (gating, cost counts, the removal check)."""
        ...

    def outputs(self, out: Any) -> int | None:
        """From the model's eval-mode output on an example, the number of classes its targets must fall in (None:
        not checked); raises `InputError` naming what is wrong with the output."""
        ...

    def label_bounds(self, target: Any) -> tuple[int, int] | None:
        """The smallest and largest class index in a batch's targets that must fall in the model's classes (CPU
        tensors only; None: nothing to check)."""
        ...

    def check(self, batch: Any, where: str) -> None:
        """Raise `DataError` naming the `where` loader when a batch cannot be read as this task's (the pre-flight
        look at each loader's first batch)."""
        ...


def _move(t: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on `device`."""
    if isinstance(t, torch.Tensor):
        return t if t.device == device else t.to(device, non_blocking=True)
    if isinstance(t, Mapping):
        return {k: _move(v, device) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_move(v, device) for v in t)
    return t


class _CountMeter:
    """Σ numerator / Σ denominator in device tensors (one sync in `compute`)."""

    def __init__(self, key: str, fn: Callable, device: torch.device):
        self.key, self.fn = key, fn
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)

    def update(self, out: Any, target: Any) -> None:
        num, den = self.fn(out, target)
        self.sums += torch.stack([num.double(), torch.as_tensor(den, device=self.sums.device).double()])

    def compute(self) -> dict[str, float]:
        from . import dist

        sums = self.sums.clone()
        if dist.active():
            dist.all_reduce_([sums], "sum")
        num, den = sums.tolist()
        return {self.key: num / den if den else float("nan")}


class _TensorBatches:
    """`(images, target)` batches of tensors, the model called on the images alone (classification,
    segmentation)."""

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0], batch[1]

    def to(self, x: Any, target: Any, device: torch.device) -> tuple[Any, Any]:
        return _move(x, device), _move(target, device)

    def train_args(self, x: Any, target: Any) -> tuple:
        return (x,)

    def eval_args(self, x: Any) -> tuple:
        return (x,)

    def count(self, target: torch.Tensor) -> int:
        return target.shape[0]

    def example(self, x: Any) -> torch.Tensor:
        return x


class Classification(_TensorBatches):
    """Cross-entropy and top-1 accuracy over `[batch, classes]` logits (of a tuple output, the first element: the
    main head of a model with auxiliary heads)."""

    name = "classification"
    metric = "acc"
    higher_is_better = True
    train_metric = "acc"
    eval_loss = True

    @staticmethod
    def logits(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, (tuple, list)) else out

    def loss(self, out: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(self.logits(out).float(), target, reduction=reduction)

    def hits(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        return (self.logits(out).argmax(1) == target).sum()

    def running(self, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a fill, not a host copy: capturable in a CUDA graph
        return self.hits(out, target), torch.full((), float(target.shape[0]), device=target.device)

    def meter(self, device: torch.device) -> Meter:
        return _CountMeter("acc", self.running, device)

    def outputs(self, out: Any) -> int | None:
        if out.dim() != 2:
            raise InputError(f"the model's output has shape {tuple(out.shape)}; the classification task reads "
                             "[batch, classes] logits: pass output_fn=... to read them, or task='segmentation' / "
                             "'detection' for a dense model")
        return out.shape[1]

    def label_bounds(self, target: Any) -> tuple[int, int] | None:
        if not isinstance(target, torch.Tensor) or target.device.type != "cpu" or not target.numel():
            return None
        lo, hi = torch.aminmax(target)
        return int(lo), int(hi)

    def check(self, batch: Any, where: str) -> None:
        at = f"the {where} loader's first batch"
        if isinstance(batch, dict):
            raise DataError(f"{at} is a dict (keys {sorted(map(str, batch))}); the classification task reads "
                            "(images, labels) pairs: make the dataset return a tuple (or wrap the loader so it yields "
                            "them)")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{at} is a {type(batch).__name__}; the classification task reads (images, labels) pairs")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{at} holds a {type(x).__name__} and a {type(y).__name__}; give tensors (the "
                            "DataLoader's default collate makes them from a dataset of (tensor, int) pairs)")
        shape = tuple(y.shape)
        if y.is_floating_point() or y.dtype == torch.bool:
            kind = "one-hot or soft" if y.dim() == 2 else y.dtype
            raise DataError(f"{at} has {kind} labels ({y.dtype}, shape {shape}); the classification task needs "
                            "integer class indices of shape [batch]: " +
                            ("y.argmax(1)" if y.dim() == 2 else "y.long()") + " in the dataset or a collate_fn")
        if y.dtype not in (torch.int64, torch.uint8):
            raise DataError(f"{at} has {y.dtype} labels; cross-entropy reads int64 class indices: y.long() in the "
                            "dataset or a collate_fn")
        if y.dim() == 2:
            raise DataError(f"{at} has labels of shape {shape}, which look one-hot; give class indices of shape "
                            "[batch] (y.argmax(1))" + ("; masks of [batch, H, W] are task='segmentation'"
                                                       if x.dim() == 4 and shape == (x.shape[0], x.shape[2]) else ""))
        if y.dim() == 3:
            raise DataError(f"{at} has labels of shape {shape}: per-pixel masks are the segmentation task "
                            "(task='segmentation')")
        if y.dim() != 1:
            raise DataError(f"{at} has labels of shape {shape}; the classification task needs shape [batch]")
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise DataError(f"{at} has {x.shape[0] if x.dim() else 0} images but {y.shape[0]} labels")


class _Confusion:
    """A `classes × classes` confusion matrix on the device (rows: truth, columns: prediction); mIoU and pixel
    accuracy from it."""

    def __init__(self, task: Segmentation, device: torch.device):
        self.task, self.matrix = task, None

    def update(self, out: Any, target: torch.Tensor) -> None:
        logits = self.task.logits(out, target)
        c = logits.shape[1]
        if self.matrix is None:
            self.matrix = torch.zeros(c * c, device=logits.device, dtype=torch.long)
        # ignored pixels go to an extra bin that is dropped (no boolean indexing: one host sync fewer per batch)
        cell = torch.where(target != self.task.ignore_index, target * c + logits.argmax(1), c * c)
        self.matrix += torch.bincount(cell.flatten(), minlength=c * c + 1)[: c * c]

    def compute(self) -> dict[str, float]:
        from . import dist

        if self.matrix is None:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        m = self.matrix.clone()
        if dist.active():
            dist.all_reduce_([m], "sum")
        c = int(round(m.numel() ** 0.5))
        m = m.view(c, c).double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0  # a class neither in the truth nor predicted has no IoU
        iou = tp[present] / union[present]
        return {"miou": float(iou.mean()) if iou.numel() else float("nan"),
                "pixel_acc": float(tp.sum() / m.sum().clamp_min(1))}


@dataclasses.dataclass
class Segmentation(_TensorBatches):
    """Per-pixel cross-entropy with an ignore index, mean IoU (`miou`, over the classes present in the truth or the
    predictions) and pixel accuracy. The model returns `[batch, classes, h, w]` logits, or a dict with `out` (and
    optionally `aux`: torchvision's FCN / DeepLab / LR-ASPP); logits of another size than the mask are resized
    bilinearly to it (as torchvision's models do to their input)."""

    ignore_index: int = 255
    aux_weight: float = 0.5  # the auxiliary head's loss weight (torchvision's reference recipe); 0 leaves it out

    name = "segmentation"
    metric = "miou"
    higher_is_better = True
    train_metric = "pixel_acc"
    eval_loss = True

    def logits(self, out: Any, target: torch.Tensor | None = None, key: str = "out") -> torch.Tensor:
        if isinstance(out, Mapping):
            out = out[key]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if target is not None and tuple(out.shape[-2:]) != tuple(target.shape[-2:]):
            out = F.interpolate(out, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
        return out

    def loss(self, out: Any, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss = F.cross_entropy(self.logits(out, target).float(), target, ignore_index=self.ignore_index)
        if self.aux_weight and isinstance(out, Mapping) and out.get("aux") is not None:
            loss = loss + self.aux_weight * F.cross_entropy(self.logits(out, target, "aux").float(), target,
                                                            ignore_index=self.ignore_index)
        return loss * target.shape[0] if reduction == "sum" else loss

    def running(self, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = target != self.ignore_index
        hits = ((self.logits(out, target).argmax(1) == target) & valid).sum()
        return hits, valid.sum()

    def meter(self, device: torch.device) -> Meter:
        return _Confusion(self, device)

    def outputs(self, out: Any) -> int | None:
        logits = self.logits(out)
        if logits.dim() != 4:
            raise InputError(f"the model's output has shape {tuple(logits.shape)}; the segmentation task reads "
                             "[batch, classes, H, W] logits (or a dict with 'out'): pass output_fn=... to read them")
        return logits.shape[1]

    def label_bounds(self, target: Any) -> tuple[int, int] | None:
        if not isinstance(target, torch.Tensor) or target.device.type != "cpu":
            return None
        valid = target[target != self.ignore_index]
        if not valid.numel():
            return None
        lo, hi = torch.aminmax(valid)
        return int(lo), int(hi)

    def check(self, batch: Any, where: str) -> None:
        at = f"the {where} loader's first batch"
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{at} is a {type(batch).__name__}; the segmentation task reads (images, masks) pairs")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{at} holds a {type(x).__name__} and a {type(y).__name__}; the segmentation task reads "
                            "an image tensor [batch, 3, H, W] and a mask tensor [batch, H, W]")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{at} has {y.dtype} masks; the segmentation task reads integer class indices "
                            f"(ignore index {self.ignore_index}): mask.long() in the dataset")
        if y.dim() != 3 or x.dim() != 4:
            raise DataError(f"{at} has images of shape {tuple(x.shape)} and masks of shape {tuple(y.shape)}; the "
                            "segmentation task reads [batch, C, H, W] images and [batch, H, W] masks")
        if x.shape[0] != y.shape[0] or tuple(x.shape[-2:]) != tuple(y.shape[-2:]):
            raise DataError(f"{at} has images of shape {tuple(x.shape)} but masks of shape {tuple(y.shape)}: each "
                            "mask must have its image's height and width")


class _MeanAP:
    """COCO mAP through torchmetrics' `MeanAveragePrecision` (pycocotools' evaluation)."""

    def __init__(self, device: torch.device):
        try:
            from torchmetrics.detection import MeanAveragePrecision
        except ImportError as err:
            raise MissingExtraError("the detection task's mAP needs the tasks extra (torchmetrics, pycocotools): "
                                    "pip install 'slimrarts[tasks]'") from err
        self.map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")

    def update(self, out: Any, target: Any) -> None:
        keys = ("boxes", "scores", "labels")
        self.map.update([{k: o[k].detach().cpu() for k in keys} for o in out],
                        [{k: t[k].cpu() for k in ("boxes", "labels")} for t in target])

    def compute(self) -> dict[str, float]:
        m = self.map.compute()  # synchronised over a process group by torchmetrics
        return {"map": float(m["map"]), "map_50": float(m["map_50"])}


class Detection:
    """torchvision's detection models: `(images, targets)` batches (lists of `[3, H, W]` images in [0, 1] and dicts
    with `boxes` `[n, 4]` xyxy pixels and `labels` `[n]` in 1..classes-1, 0 being the background), the sum of the
    loss dict the model returns in train mode, COCO mAP@[.5:.95] (`map`) and mAP@.5 (`map_50`) in eval mode.
    There is no eval-mode loss (the models return detections there)."""

    name = "detection"
    metric = "map"
    higher_is_better = True
    train_metric = None
    eval_loss = False
    min_label = 1  # 0 is the background class

    def split(self, batch: Any) -> tuple[Any, Any]:
        return batch[0], batch[1]

    def to(self, x: Any, target: Any, device: torch.device) -> tuple[Any, Any]:
        return _move(list(x), device), _move(list(target), device)

    def train_args(self, x: Any, target: Any) -> tuple:
        return (list(x), list(target))

    def eval_args(self, x: Any) -> tuple:
        return (list(x),)

    def loss(self, out: Any, target: Any, reduction: str = "mean") -> torch.Tensor:
        if not isinstance(out, Mapping):
            raise InputError("the detection task's loss reads the dict of losses a torchvision detection model "
                             f"returns in train mode; got a {type(out).__name__}")
        loss = sum(v.float() for v in out.values())
        return loss * len(target) if reduction == "sum" else loss

    def running(self, out: Any, target: Any) -> None:
        return None

    def count(self, target: Any) -> int:
        return len(target)

    def meter(self, device: torch.device) -> Meter:
        return _MeanAP(device)

    def example(self, x: Any) -> torch.Tensor:
        images = list(x)
        same = all(tuple(i.shape) == tuple(images[0].shape) for i in images)
        return torch.stack(images) if same else images[0][None]

    def outputs(self, out: Any) -> int | None:
        if not (isinstance(out, (list, tuple)) and out and isinstance(out[0], Mapping) and "boxes" in out[0]):
            raise InputError(f"the model's eval-mode output is a {type(out).__name__}; the detection task reads "
                             "torchvision detection models, which return a list of dicts with 'boxes', 'scores' "
                             "and 'labels'")
        return None

    def classes_of(self, model: nn.Module) -> int | None:
        """The classes (background included) a torchvision detection model predicts, read from its classifier:
        Faster / Mask R-CNN's `roi_heads.box_predictor.cls_score`, RetinaNet's and FCOS's
        `head.classification_head.num_classes`, SSD's `head.classification_head.num_columns`; None for another
        model (its labels are then not checked against it)."""
        inner = getattr(model, "module", model)  # DDP, compiled
        cls_score = getattr(getattr(getattr(inner, "roi_heads", None), "box_predictor", None), "cls_score", None)
        if isinstance(cls_score, nn.Linear):
            return cls_score.out_features
        head = getattr(getattr(inner, "head", None), "classification_head", None)
        for attr in ("num_classes", "num_columns"):
            if isinstance(getattr(head, attr, None), int):
                return getattr(head, attr)
        return None

    def label_bounds(self, target: Any) -> tuple[int, int] | None:
        labels = [t["labels"] for t in target if t["labels"].device.type == "cpu" and t["labels"].numel()]
        if not labels:
            return None
        lo, hi = torch.aminmax(torch.cat(labels))
        return int(lo), int(hi)

    def check(self, batch: Any, where: str) -> None:
        at = f"the {where} loader's first batch"
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError(f"{at} is a {type(batch).__name__}; the detection task reads (images, targets) pairs "
                            "(collate_fn=slimrarts.data.detection_collate)")
        images, targets = batch[0], batch[1]
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            raise DataError(f"{at} has {len(images)} images but targets of type {type(targets).__name__}; the "
                            "detection task reads a list of target dicts, one per image (collate_fn="
                            "slimrarts.data.detection_collate)")
        for i, (img, t) in enumerate(zip(images, targets, strict=True)):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or not img.is_floating_point():
                raise DataError(f"{at}'s image {i} is not a float [3, H, W] tensor")
            if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
                raise DataError(f"{at}'s target {i} is not a dict with 'boxes' and 'labels'")
            b = t["boxes"]
            if b.dim() != 2 or b.shape[-1] != 4 or b.shape[0] != t["labels"].shape[0]:
                raise DataError(f"{at}'s target {i} has boxes of shape {tuple(b.shape)} and "
                                f"{tuple(t['labels'].shape)} labels; give boxes [n, 4] (xyxy) and labels [n]")
            if b.numel() and bool(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any()):
                raise DataError(f"{at}'s target {i} has a box of non-positive width or height (boxes are x1, y1, "
                                "x2, y2 in pixels)")
            h, w = img.shape[-2:]
            outside = (b[:, 0] < -1) | (b[:, 1] < -1) | (b[:, 2] > w + 1) | (b[:, 3] > h + 1) if b.numel() else None
            if outside is not None and bool(outside.any()):
                box = [round(v, 1) for v in b[outside][0].tolist()]
                raise DataError(f"{at}'s target {i} has the box {box} (x1, y1, x2, y2) outside its {w}×{h} image: "
                                "boxes are in the pixels of the image as the transform returns it (a resize must "
                                "scale the boxes with it; slimrarts.data's detection transforms do)")


@dataclasses.dataclass
class CustomTask:
    """A built-in task with the user's loss and/or metric: `loss_fn(output, target) -> scalar tensor` (train mode)
    and `metric_fn(output, target) -> float or 0-d tensor` (eval mode), averaged over the evaluated samples and
    reported as `metric_name` (with `higher_is_better`)."""

    base: Any = dataclasses.field(default_factory=Classification)
    loss_fn: Callable | None = None
    metric_fn: Callable | None = None
    metric_name: str = "metric"
    higher_is_better: bool = True

    def __post_init__(self):
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise InputTypeError(f"loss_fn must be callable (output, target) -> loss, got {type(self.loss_fn)}")
        if self.metric_fn is not None and not callable(self.metric_fn):
            raise InputTypeError(f"metric_fn must be callable (output, target) -> float, got {type(self.metric_fn)}")
        if self.metric_fn is None:
            self.metric_name, self.higher_is_better = self.base.metric, self.base.higher_is_better

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def metric(self) -> str:
        return self.metric_name

    @property
    def train_metric(self) -> str | None:
        return self.base.train_metric if self.loss_fn is None else None

    @property
    def eval_loss(self) -> bool:
        return self.base.eval_loss and self.loss_fn is None

    def loss(self, out: Any, target: Any, reduction: str = "mean") -> torch.Tensor:
        if self.loss_fn is None:
            return self.base.loss(out, target, reduction)
        loss = self.loss_fn(out, target)
        return loss * self.base.count(target) if reduction == "sum" else loss

    def running(self, out: Any, target: Any):
        return self.base.running(out, target) if self.loss_fn is None else None

    def meter(self, device: torch.device) -> Meter:
        if self.metric_fn is None:
            return self.base.meter(device)
        count = self.base.count

        def each(out, target):
            n = count(target)
            value = torch.as_tensor(self.metric_fn(out, target), device=device, dtype=torch.float64)
            return value * n, n

        return _CountMeter(self.metric_name, each, device)

    def __getattr__(self, name: str):  # split, to, train_args, eval_args, count, example, outputs, check, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


CLASSIFICATION = Classification()
_TASKS = {"classification": Classification, "segmentation": Segmentation, "detection": Detection}


def list_tasks() -> list[str]:
    return list(_TASKS)


def get_task(task: Any = None, *, loss_fn: Callable | None = None, metric_fn: Callable | None = None,
             metric_name: str = "metric", higher_is_better: bool = True, **options) -> Any:
    """The task for a name (`classification`, `segmentation`, `detection`; `options` are its settings, e.g.
    `ignore_index`), an object that implements `Task`, or None (classification); with `loss_fn` / `metric_fn`,
    a `CustomTask` over it."""
    if task is None or isinstance(task, str):
        name = task or "classification"
        if name not in _TASKS:
            raise InputError(f"task={name!r} is not a task; choose one of {', '.join(_TASKS)} or pass an object with "
                             "the methods of slimrarts.engine.task.Task")
        cls = _TASKS[name]
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(options) - fields)
        if unknown:
            raise InputError(f"task {name!r} has no setting {', '.join(unknown)}"
                             + (f"; its settings: {', '.join(sorted(fields))}" if fields else " (it has none)"))
        task = cls(**options) if options or fields else (CLASSIFICATION if name == "classification" else cls())
    elif options:
        raise InputError(f"task settings {sorted(options)} go with a task name, not a task object")
    else:
        missing = [m for m in ("split", "loss", "meter", "count") if not callable(getattr(task, m, None))]
        if missing:
            raise InputTypeError(f"task {type(task).__name__} lacks {', '.join(missing)}: give a task name or an "
                                 "object with the methods of slimrarts.engine.task.Task")
    if loss_fn is not None or metric_fn is not None:
        task = CustomTask(task, loss_fn=loss_fn, metric_fn=metric_fn, metric_name=metric_name,
                          higher_is_better=higher_is_better)
    return task
