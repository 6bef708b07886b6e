"""Recipes: the YAML schema of a run, loading with `base:` inheritance and `--set` overrides, and dumping."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from ._io import atomic_write
from .config import ConfigError, build, deep_merge, field, resume_safe_keys, set_by_path, to_dict
from .data.registry import describe_datasets, list_datasets
from .errors import ResumeMismatchError
from .methods import describe_methods, get_method, list_methods

__all__ = [
    "BaselinesConfig",
    "DataConfig",
    "DistConfig",
    "TaskConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "DistillConfig",
    "BudgetConfig",
    "CostTermConfig",
    "ShrinkConfig",
    "ReportConfig",
    "ArchOptimConfig",
    "SearchConfig",
    "PruneConfig",
    "Recipe",
    "load_recipe",
    "parse_overrides",
    "dump_recipe",
    "save_or_check_recipe",
    "resume_changes",
    "legacy_settings",
    "apply_settings",
    "note_changes_in_recipe",
    "read_recipe_yaml",
    "DEVICE_FIELD",
    "RESUME_SAFE",
    "is_cell_recipe",
    "ConfigError",
]

logger = logging.getLogger(__name__)


def _valid_device(v: str) -> bool:
    return v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())


DEVICE_FIELD = dict(check=_valid_device, allowed="auto, cpu, cuda, cuda:N or mps")  # shared by the recipe schemas
# a recipe's name names its default run folder (runs/<name>/<time>): one plain folder name, never a path
NAME_FIELD = dict(check=lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) is not None,
                  allowed="a plain name of letters, digits, '.', '_' and '-' (it names the run folder runs/<name>/; "
                          "no '/', no '..'): choose the folder itself with --out")


_positive = dict(check=lambda v: v > 0, allowed="a number > 0")
_non_negative = dict(check=lambda v: v >= 0, allowed="a number >= 0")


@dataclasses.dataclass
class DataConfig:
    """Which data set, where it is, and how it is batched."""

    name: str = field("cifar10", check=lambda v: v in list_datasets(),
                      allowed=lambda: f"a registered data set: {describe_datasets()}")
    root: str | None = None  # folder, archive or torchvision folder; None: $SLIMRARTS_DATA, cache, download (CIFAR)
    download: bool = True
    limit_per_class: int | None = field(None, check=lambda v: v >= 1, allowed="an integer >= 1 or null")
    test_limit_per_class: int | None = field(None, check=lambda v: v >= 1, allowed="an integer >= 1 or null")
    batch_size: int = field(128, check=lambda v: v >= 1, allowed="an integer >= 1")
    eval_batch_size: int = field(500, check=lambda v: v >= 1, allowed="an integer >= 1")
    augment: bool = True
    split_seed: int = 0  # seed of the D_t / D_v halves and of subsets
    cutout: int = field(0, check=lambda v: v >= 0, allowed="an integer >= 0 (0: off)")  # side of a zeroed square
    # imagefolder: images are stored at `resize` (short side, then centre crop), trained on random-resized
    # crops of `image_size` with scale `crop_scale`, evaluated on the centre `image_size` crop. voc: trained on
    # random-resized crops of `image_size` (masks follow) with scale `crop_scale`, evaluated resized to it
    image_size: int | None = field(None, check=lambda v: v >= 8, allowed="an integer >= 8 or null")
    resize: int | None = field(None, check=lambda v: v >= 8, allowed="an integer >= 8 or null")
    crop_scale: list[float] | None = field(None, check=lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                                           allowed="[min, max] with 0 < min <= max <= 1, or null (the reader's "
                                                   "default: [0.08, 1] for imagefolder, [0.25, 1] for voc)")
    # imagefolder only: `memory` holds the decoded set on the training device; `stream` reads the image files with
    # a DataLoader's worker processes each epoch (for sets that do not fit); `auto` streams above `memory_gb`
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_gb: float = field(8.0, check=lambda v: v > 0, allowed="a number of GB > 0")  # per process, decoded
    # voc only: how many classes the masks hold when the folder has no classes.txt
    num_classes: int | None = field(None, check=lambda v: v >= 2, allowed="an integer >= 2 or null")
    # coco only: a box of no area is a named error (`error`) or left out and counted (`drop`)
    empty_boxes: Literal["error", "drop"] = "error"
    workers: int | None = field(None, check=lambda v: v >= 0,
                                allowed="an integer >= 0 or null (null: CPU cores / processes on the node, at most 8)")

    def validate(self, where: str) -> None:
        for key, users in (("image_size", ("imagefolder", "voc")), ("crop_scale", ("imagefolder", "voc")),
                           ("resize", ("imagefolder",)), ("num_classes", ("voc",))):
            if getattr(self, key) is not None and self.name not in users:
                raise ConfigError(f"{where}.{key}: only used by data.name={' or '.join(users)}, not {self.name} "
                                  "(CIFAR stays 32x32; COCO images keep their size, the detector resizes them): "
                                  "remove it or set it to null")
        if self.name in ("voc", "coco"):
            for key in ("limit_per_class", "test_limit_per_class"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{where}.{key}: a {self.name} set has no class per image; remove it (make a "
                                      "smaller split file instead)")
        if self.empty_boxes != "error" and self.name != "coco":
            raise ConfigError(f"{where}.empty_boxes={self.empty_boxes}: only used by data.name=coco, not {self.name}; "
                              "remove it")
        if self.name != "imagefolder" and self.loader == "stream":
            raise ConfigError(f"{where}.loader=stream reads image files and is used by data.name=imagefolder; "
                              f"{self.name} is held in memory (set it to auto or memory)")


@dataclasses.dataclass
class TaskConfig:
    """What the network learns (`slimrarts.engine.task`): `classification` (cross-entropy, top-1), `segmentation`
    (per-pixel cross-entropy with `ignore_index`, mIoU) or `detection` (torchvision detection models, COCO mAP)."""

    name: Literal["classification", "segmentation", "detection"] = "classification"
    ignore_index: int = 255  # segmentation: mask value left out of the loss and the metrics
    aux_weight: float = field(0.5, check=lambda v: v >= 0, allowed="a number >= 0")  # segmentation: aux head's loss

    def options(self) -> dict:
        """The settings of the named task (`engine.task.get_task(name, **options)`)."""
        if self.name == "segmentation":
            return {"ignore_index": self.ignore_index, "aux_weight": self.aux_weight}
        return {}


@dataclasses.dataclass
class DistConfig:
    """Runs over several processes (`torchrun --nproc_per_node=N -m slimrarts ...`); one process ignores this.

    `batch: global` keeps `data.batch_size` (and `eval_batch_size`) the batch of one step over all processes, each
    taking an equal share, so a run over N processes follows the single-process run except for the batch statistics
    of norms (each process normalises its share) — unless `sync_bn`, which synchronises them (SyncBatchNorm; NCCL on
    GPUs only). `batch: process` makes it each process's batch (the global batch grows with N).
    """

    batch: Literal["global", "process"] = "global"
    sync_bn: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL when the run's device is a GPU, else gloo
    timeout_s: int = field(1800, check=lambda v: v >= 10, allowed="an integer >= 10 (seconds)")


@dataclasses.dataclass
class ModelConfig:
    """The network: a zoo name, `timm:<name>` or `torchvision:<name>`, plus constructor arguments."""

    name: str = "preresnet56"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # a state_dict file to start from (e.g. a trained baseline)

    def validate(self, where: str) -> None:
        if "num_classes" in self.kwargs:
            raise ConfigError(f"{where}.kwargs.num_classes: the number of classes comes from the data set (data.name); "
                              "remove it from the model's arguments")


_MILESTONES = dict(default_factory=lambda: [0.5, 0.75], check=lambda v: all(0 < m < 1 for m in v) and v == sorted(v),
                   allowed="increasing fractions of the epochs, each in (0, 1)")
_EPOCHS_GE0 = dict(check=lambda v: v >= 0, allowed="an integer >= 0")


@dataclasses.dataclass
class OptimConfig:
    """SGD for the network weights and its learning-rate schedule."""

    lr: float = field(0.1, resume_safe=True, **_positive)
    momentum: float = field(0.9, check=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")
    nesterov: bool = False
    weight_decay: float = field(1e-4, **_non_negative)
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: list[float] = field(**_MILESTONES)
    gamma: float = field(0.1, **_positive)
    warmup_epochs: int = field(0, **_EPOCHS_GE0)
    min_lr: float = field(0.0, **_non_negative)  # floor of the cosine schedule


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation from the dense model while fine-tuning: (1 − weight)·CE + weight·T²·KL."""

    weight: float = field(0.5, check=lambda v: 0 <= v <= 1, allowed="a number in [0, 1]")
    temperature: float = field(4.0, **_positive)


@dataclasses.dataclass
class TrainConfig:
    """A training phase: epochs, optimizer and how the step runs."""

    epochs: int = field(160, check=lambda v: v >= 1, allowed="an integer >= 1")
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    cuda_graph: bool = False  # capture the train step in a CUDA graph (takes effect on CUDA only)
    log_every: int = field(50, check=lambda v: v >= 1, allowed="an integer >= 1")
    distill: DistillConfig | None = None  # finetune only: distil from the dense model; null: off


@dataclasses.dataclass
class ArchOptimConfig:
    """The optimizer of the architecture parameters α and its schedule (constant by default, as in DARTS/RARTS)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = field(1e-3, resume_safe=True, **_positive)
    schedule: Literal["constant", "step", "cosine"] = "constant"
    milestones: list[float] = field(**_MILESTONES)
    gamma: float = field(0.1, **_positive)
    warmup_epochs: int = field(0, **_EPOCHS_GE0)
    min_lr: float = field(0.0, **_non_negative)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999], check=lambda v: len(v) == 2 and all(
        0 <= b < 1 for b in v), allowed="two numbers in [0, 1)")
    weight_decay: float = field(0.0, **_non_negative)
    momentum: float = field(0.9, check=lambda v: 0 <= v < 1, allowed="a number in [0, 1)")  # sgd only


@dataclasses.dataclass
class CostTermConfig:
    """The cost term μ·Cost(α)/Cost_dense in every search method's α-step (0: off)."""

    mu: float = field(0.0, resume_safe=True, **_non_negative)
    kind: Literal["macs", "params", "latency"] = "macs"  # latency: the prune.budget latency model's tables
    tau: float | None = field(None, **_positive)  # soft count of live channels; null: mean |α| per group


@dataclasses.dataclass
class ShrinkConfig:
    """Make the channels that will lose small before the cut, so cutting them costs little (ratio/budget modes).

    `which: all` applies the ℓ1 proximal step of `strength` to every α (as ℓ1 mode does, but the ratio or budget
    still decides); `which: losers` applies it only to the channels the selection would prune now (re-chosen at each
    epoch's start and every `every` steps), with a strength growing linearly to `strength` over the search.
    """

    which: Literal["none", "all", "losers"] = "none"  # (not `on`: YAML 1.1 reads the key `on` as true)
    strength: float = field(0.0, **_non_negative)  # per unit of α learning rate, as prune.l1
    every: int = field(20, check=lambda v: v >= 1, allowed="an integer >= 1 (steps)")  # losers: re-chosen this often


@dataclasses.dataclass
class SearchConfig:
    """How α is learned: the algorithm, its coefficients, and the optimizers of w, y and α."""

    method: str = field("rarts", check=lambda v: v in list_methods(), allowed=describe_methods)
    epochs: int = field(160, check=lambda v: v >= 1, allowed="an integer >= 1")
    # λ: rarts: weight of L_t (w-step and α-step); milenas: weight of L_v
    lam: float = field(1.0, resume_safe=True, **_positive)
    beta: float = field(1e-3, resume_safe=True, **_non_negative)  # β: coupling of w and y
    xi: float | None = field(None, **_positive)  # darts2 unrolling step; null: the w learning rate
    grad_clip: float | None = field(None, resume_safe=True, **_positive)  # clip the w gradient norm (DARTS: 5)
    optim: OptimConfig = field(default_factory=OptimConfig)  # w (and y unless optim_y is set)
    optim_y: OptimConfig | None = None
    optim_arch: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    final_weights: Literal["y", "w", "mean"] = "y"  # which weights the slim model is cut from (two-net methods)
    # α's start: ones (the paper) or magnitude (per-group normalised |γ|, the layers rescaled; output unchanged)
    init: Literal["ones", "magnitude"] = "ones"
    # what ranks the channels at the cut: alpha (|α|, the paper), alpha_gamma (|α|·|γ|), grad (Σ|α ⊙ ∇_α|)
    score: Literal["alpha", "alpha_gamma", "grad"] = "alpha"
    cost: CostTermConfig = field(default_factory=CostTermConfig)
    shrink: ShrinkConfig = field(default_factory=ShrinkConfig)
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    cuda_graph: bool = False  # capture the search iteration in a CUDA graph (CUDA only)
    log_every: int = field(50, check=lambda v: v >= 1, allowed="an integer >= 1")

    def as_train(self) -> TrainConfig:
        """This section as a `TrainConfig`: the training phase of a baseline on the whole training set."""
        return TrainConfig(epochs=self.epochs, optim=self.optim, amp=self.amp, channels_last=self.channels_last,
                           cuda_graph=self.cuda_graph, log_every=self.log_every)


@dataclasses.dataclass
class BaselinesConfig:
    """The baselines' and criteria's own settings (their training phase reads `search`: epochs, optim, amp)."""

    sparsity: float = field(1e-5, **_non_negative)  # slimming: s of s·‖γ‖₁ (NS: 1e-5 ResNet-164, 1e-4 VGG/MobileNet)
    init_gamma: float | None = field(0.5, **_positive)  # slimming: BN γ initialisation (NS: 0.5); null keeps it
    taylor_batches: int = field(10, check=lambda v: v >= 1, allowed="an integer >= 1")  # taylor: batches of gradients


def _budget_value(v) -> bool:
    return not isinstance(v, bool) and (isinstance(v, str) and v.strip() != "" or isinstance(v, float) and v > 0)


@dataclasses.dataclass
class BudgetConfig:
    """The most the slim model may cost: `target` is what REMAINS of the dense model's MACs, parameters or latency.

    `target` is a fraction of the dense cost ("50%", 0.5: keep at most half) or an absolute value ("20M" MACs,
    "1.2M" params, "3.5ms").
    Latency is measured on `device` at `batch_size`; the cut model is timed and the selection tightened up to
    `tighten_rounds` times if it misses.
    """

    kind: Literal["macs", "params", "latency"] = "macs"
    target: str | float = field("50%", check=_budget_value,
                              allowed='a fraction of the dense cost ("50%", 0.5) or an absolute value ("20M", "3.5ms")')
    device: str | None = field(None, **DEVICE_FIELD)  # latency: where to time (null: the run's device)
    batch_size: int = field(1, check=lambda v: v >= 1, allowed="an integer >= 1")  # latency: batch timed
    tighten_rounds: int = field(3, check=lambda v: v >= 1, allowed="an integer >= 1")  # latency: re-selections
    repeats: int = field(10, check=lambda v: v >= 1, allowed="an integer >= 1")  # latency: timings per grid point
    # latency: what the cut is timed in (eager PyTorch; onnxruntime's CPU provider on the exported model; auto:
    # onnxruntime on a CPU where the deploy extra is installed)
    runtime: Literal["torch", "onnxruntime", "auto"] = "torch"


@dataclasses.dataclass
class PruneConfig:
    """Which channels are gated and which lose."""

    scope: list[Literal["internal", "branch-input", "coupled"]] = field(
        default_factory=lambda: ["internal"],
        check=lambda v: len(v) >= 1 and len(set(v)) == len(v) and not {"branch-input", "coupled"} <= set(v),
        allowed="a non-empty list of distinct scopes (internal, branch-input, coupled); not both branch-input "
                "and coupled")
    mode: Literal["ratio", "budget", "l1"] = "ratio"  # what decides the losers: a channel ratio, a budget, ℓ1 zeros
    ratio: float = field(0.4, check=lambda v: 0 <= v < 1, allowed="a fraction in [0, 1)")  # share of channels PRUNED
    budget: BudgetConfig | None = None  # mode budget: what is KEPT of the dense cost; mode l1: a stopping rule
    l1: float = field(1e-4, **_non_negative)  # γ of γ‖α‖₁ (l1 mode)
    min_channels: int = field(1, check=lambda v: v >= 1, allowed="an integer >= 1")
    round_to: int | None = field(None, check=lambda v: v >= 1, allowed="an integer >= 1 or null")
    reference: str | None = None  # random: a run folder (or width_spec.json) whose per-group kept counts to copy
    exclude: list[str] = field(default_factory=list)  # module-name globs whose output channels are never pruned
    max_pruned: float | dict[str, float] | None = field(
        None, check=lambda v: all(0 <= f <= 1 for f in (v.values() if isinstance(v, dict) else [v])),
        allowed="a fraction in [0, 1], or {module glob: fraction}")  # cap on the pruned share of each group
    # batches of training images that re-estimate the BatchNorm statistics of the cut network (0: off)
    recalibrate: int = field(40, check=lambda v: v >= 0, allowed="an integer >= 0 (batches; 0: off)")

    def validate(self, where: str) -> None:
        if self.mode == "budget" and self.budget is None:
            raise ConfigError(f"{where}.mode=budget needs {where}.budget, e.g. {{kind: macs, target: '50%'}}")
        if self.mode == "ratio" and self.budget is not None:
            raise ConfigError(f"{where}.budget is set but {where}.mode is ratio: exactly one of ratio and budget is in "
                              f"force; set {where}.mode=budget (or remove {where}.budget)")




@dataclasses.dataclass
class LatencyReportConfig:
    """`report.latency`: whether the report times the dense and the slim model, and in what (`true` / `false` is
    short for `{enabled: true}` / `{enabled: false}`)."""

    enabled: bool = True  # on the run's device (and on the CPU at batch 1 when that differs)
    # torch: eager PyTorch; onnxruntime: both models exported (as `slimrarts export` does) and run by onnxruntime's
    # CPU provider, on the CPU; auto: onnxruntime on a CPU run where the deploy extra is installed, else torch
    runtime: Literal["torch", "onnxruntime", "auto"] = "torch"

    def __bool__(self) -> bool:
        return self.enabled


@dataclasses.dataclass
class ReportConfig:
    """What the report measures beyond accuracy and counts."""

    latency: LatencyReportConfig | bool = field(default_factory=LatencyReportConfig)
    batch_sizes: list[int] | None = field(None, check=lambda v: all(b >= 1 for b in v),
                                          allowed="a list of integers >= 1, or null")  # null: [1, data.batch_size]
    rounds: int = field(3, check=lambda v: v >= 1, allowed="an integer >= 1")  # interleaved rounds of timing
    repeats: int = field(10, check=lambda v: v >= 1, allowed="an integer >= 1")  # forward passes per round

    def validate(self, where: str) -> None:
        if isinstance(self.latency, bool):
            self.latency = LatencyReportConfig(enabled=self.latency)


@dataclasses.dataclass
class Recipe:
    """A whole run. Sections that a command does not use are ignored by it."""

    name: str = field("run", **NAME_FIELD)
    seed: int = 0
    device: str = field("auto", **DEVICE_FIELD)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=160))
    report: ReportConfig = field(default_factory=ReportConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self, where: str) -> None:
        """Checks across sections (those that need the model, such as channel counts, run in `prune()`)."""
        method, p = get_method(self.search.method), self.prune
        if p.reference and not method.reads_reference:
            readers = [m for m in list_methods() if get_method(m).reads_reference]
            raise ConfigError(f"prune.reference only applies to search.method={' or '.join(readers)}, not "
                              f"{method.name!r}; remove it")
        if self.task.name != "classification" and (self.finetune.distill is not None):
            raise ConfigError(f"finetune.distill: distillation matches class probabilities of a classifier; the "
                              f"{self.task.name} task has no such output here (a dense model's per-pixel or per-box "
                              "outputs would need their own loss): remove finetune.distill")
        needs = {"voc": "segmentation", "coco": "detection"}.get(self.data.name)
        if needs is not None and self.task.name != needs:
            raise ConfigError(f"data.name={self.data.name} holds {needs} data, but task.name={self.task.name}; set "
                              f"task.name: {needs}")
        if self.train.distill is not None:
            raise ConfigError("train.distill: distillation needs the dense model as teacher, which only fine-tuning "
                              "after a cut has; set it under finetune.distill")
        if self.search.shrink.which != "none" and (not method.has_alpha or p.mode == "l1"):
            raise ConfigError(f"search.shrink.which={self.search.shrink.which} shrinks α before a ratio or budget "
                              f"cut; it needs a method with α and prune.mode ratio or budget (method {method.name!r}, "
                              f"mode {p.mode}); set it to none")
        if self.search.cost.mu > 0 and not method.has_alpha:
            raise ConfigError(f"search.cost.mu={self.search.cost.mu} adds a cost term to the α-step, but "
                              f"{method.kind} {method.name!r} learns no α; set it to 0")
        if self.search.cost.mu > 0 and self.search.cost.kind == "latency" and (
                p.budget is None or p.budget.kind != "latency"):
            raise ConfigError("search.cost.kind=latency uses the latency model of prune.budget (kind latency); set "
                              "prune.budget.kind=latency or use search.cost.kind=macs")
        if p.mode == "l1" and not method.supports_l1:
            raise ConfigError(f"prune.mode=l1 learns which α reach zero; {method.kind} {method.name!r} has no α "
                              "(use prune.mode=ratio, or random with prune.reference)")


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """Parse `a.b=value` strings; values are read as YAML (`3`, `0.1`, `true`, `[1, 2]`, `null`)."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is malformed; expected key=value, e.g. train.epochs=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        out.append((key.strip(), value))
    return out


def read_recipe_yaml(path: str | os.PathLike, seen: tuple[Path, ...] = ()) -> dict:
    """The mapping of a recipe file with its `base:` chain merged in (not yet validated against a schema)."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"recipe {path}: 'base' chain loops back to itself")
    if path.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a folder, not a recipe file")
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path}: not valid YAML ({err})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"recipe {path}: not a text file (is it the recipe YAML?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: 'base' must be a path string, got {base!r}")
    return deep_merge(read_recipe_yaml(path.parent / base, seen + (path,)), data)


def is_cell_recipe(path: str | os.PathLike) -> bool:
    """Whether a recipe file describes a DARTS cell search (it has a `net` section, after `base:` inheritance)."""
    try:
        return "net" in read_recipe_yaml(path)
    except ConfigError:  # a broken file is reported by the regular loader
        return False


def load_recipe(
    source: str | os.PathLike | dict, overrides: list[str] | None = None, *, schema: type = Recipe
) -> Any:
    """Load and validate a recipe from a YAML file (or a dict), applying `key=value` overrides.

    A recipe may name another with `base: other.yaml` (relative to its own folder); its keys are merged on top.
    """
    data = copy.deepcopy(source) if isinstance(source, dict) else read_recipe_yaml(source)
    for key, value in parse_overrides(overrides):
        set_by_path(data, key, value)
    return build(schema, data)


_RESUME_FREE = ("device", "log_every", "timeout_s", "backend", "workers")  # may change on resume, unrecorded
# keys a resume may change with --set (after a divergence stop, say); each change is recorded in the run folder. They
# are the fields marked `resume_safe=True` (a cell-search recipe's: `resume_safe_keys(NasRecipe)`)
RESUME_SAFE = resume_safe_keys(Recipe)


# keys added after run folders were made with the schema: a resume of a folder whose recipe.yaml lacks one runs with
# the value here (the behaviour it was made with), not the new default
ADDED_LATER = {"prune.recalibrate": 0}
OLD_CROP_SCALE = [0.08, 1.0]  # data.crop_scale's default until it became null (the reader's own)


def _crops_as_read(data: Any, stored: bool) -> Any:
    """`data` (a recipe's data mapping) with `crop_scale` as the crops it makes: null where it is the reader's
    default. A run folder's recipe.yaml (`stored`) from before voc read the field holds the old default [0.08, 1]
    whatever its set, and only imagefolder read it (its default): so there [0.08, 1], and any value on a set that
    reads no crop_scale, is null. For the recipe given now, [0.08, 1] is null on imagefolder only (voc's is
    [0.25, 1]), so that a voc folder made before is not resumed with other crops unnoticed."""
    if not isinstance(data, dict) or data.get("crop_scale") is None:
        return data
    name = data.get("name", "cifar10")
    never_read = stored and name not in ("imagefolder", "voc")
    old_default = data["crop_scale"] == OLD_CROP_SCALE and (stored or name == "imagefolder")
    if never_read or old_default:
        return {**data, "crop_scale": None}
    return data


def read_run_recipe(path: str | os.PathLike, *, schema: type = Recipe) -> Any:
    """A run folder's recipe.yaml, read as this version reads the settings it ran with (`_crops_as_read`)."""
    raw = read_recipe_yaml(path)
    return build(schema, {**raw, "data": _crops_as_read(raw.get("data"), stored=True)} if "data" in raw else raw)


def _has_key(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _set_attr_path(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key in _RESUME_FREE:
                continue
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [(path, old, new)]


def _stored_recipe(path: Path, schema: type) -> dict:
    try:
        stored = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is damaged ({type(err).__name__}), so the settings this run used cannot be "
                          "checked; restore it from your recipe and --set values, or start again with --force"
                          ) from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{str(path)!r} is not a recipe mapping; restore it, or start again with --force")
    if "data" in stored:
        stored = {**stored, "data": _crops_as_read(stored["data"], stored=True)}
    try:  # read through the schema, so defaults added to a section compare equal
        return to_dict(build(schema, stored))
    except ConfigError:
        return stored  # compared as written: every difference is then named


def legacy_settings(recipe: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """The keys of `ADDED_LATER` that the run folder's recipe.yaml lacks (it was made before they existed), with
    the value it ran with, for this recipe's schema. Apply them with `apply_settings` on every process."""
    path = Path(run_dir) / "recipe.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}  # `resume_changes` names the damaged file
    return {key: legacy for key, legacy in ADDED_LATER.items()
            if not _has_key(raw, key) and hasattr(recipe, key.split(".")[0])}


def apply_settings(recipe: Any, values: dict[str, Any]) -> None:
    """Set dotted `values` on `recipe` (in place)."""
    for key, value in values.items():
        _set_attr_path(recipe, key, value)


def resume_changes(recipe: Any, run_dir: str | os.PathLike, *, earlier: list[tuple[str, Any]] = (),
                   finished: bool = False, unread: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """Check `recipe` against the settings the run in `run_dir` last ran with and return the changes as
    `(key, old, new)`; nothing is written.

    Those settings are its `recipe.yaml` (what it started with; a folder made before that file was kept as it
    started holds the last resume's settings) with the `earlier` changes of its resumes applied, in order, as
    `(key, new value)`. A resume under other settings would mix two experiments in one folder, so a difference is
    an error naming the keys, except for the device, logging and the keys of `RESUME_SAFE` (learning rates, λ, β,
    the cost weight, gradient clipping), which may change, e.g. to continue after a divergence stop, and the
    sections `unread` that this kind of run never reads (a dense `slimrarts train` run: search, prune,
    finetune, baselines); the changes are returned either way, for the run's record. A `finished`
    run (nothing is left to run) refuses those too: nothing would run under them. Keys of `ADDED_LATER` that the
    folder's recipe.yaml lacks are set on `recipe` to the value the run was made with (logged).
    """
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise ConfigError(f"cannot resume {str(run_dir)!r}: its recipe.yaml is missing, so the settings it ran with "
                          "cannot be checked; restore the file, or start again with --force")
    stored = _stored_recipe(path, type(recipe))
    legacy = legacy_settings(recipe, run_dir)
    for key, value in legacy.items():  # older folders resume as they were made
        logger.warning("%s was made before %s existed: resumed with %s=%r", run_dir, key, key, value)
        set_by_path(stored, key, value)
    apply_settings(recipe, legacy)
    for key, value in earlier:
        set_by_path(stored, key, value)
    now = to_dict(recipe)
    if "data" in now:
        now["data"] = _crops_as_read(now["data"], stored=False)
    diffs = _differences(stored, now)
    safe = resume_safe_keys(type(recipe))
    unsafe = [d for d in diffs if d[0] not in safe and d[0].split(".")[0] not in unread]
    if unsafe:
        shown = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in unsafe[:6])
        also = f", and the sections this run does not read ({', '.join(unread)})" if unread else ""
        raise ConfigError(f"cannot resume {str(run_dir)!r} with other settings than its recipe.yaml: {shown}"
                          f"{' …' if len(unsafe) > 6 else ''}. Resume with the same recipe and --set values (only "
                          f"{', '.join(safe)}{also} may change), or start a new run")
    if diffs and finished:
        shown = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in diffs[:6])
        raise ResumeMismatchError(
            f"cannot resume {str(run_dir)!r} with changed settings ({shown}{' …' if len(diffs) > 6 else ''}): the run "
            "is finished (its report.json is written), so nothing would run under them and its record would no "
            "longer say what produced its model. Resume it with the settings it ran with (without these --set "
            "values), or start a new run with them (another --out)")
    return diffs


def save_or_check_recipe(recipe: Any, run_dir: str | os.PathLike, resume: bool, *,
                         earlier: list[tuple[str, Any]] = (), finished: bool = False) -> list[tuple[str, Any, Any]]:
    """Write the resolved recipe into the run folder (a new run), or check it against the settings the run ran
    with (`resume`, see `resume_changes`) and return the changes. A resume never rewrites recipe.yaml's settings:
    the changes are the run's record to keep (`slimrarts.runfolder.open_run` records them)."""
    if not resume:
        dump_recipe(recipe, Path(run_dir) / "recipe.yaml")
        return []
    return resume_changes(recipe, run_dir, earlier=earlier, finished=finished)


_HEADER = "# "


def note_changes_in_recipe(run_dir: str | os.PathLike, segments: list[dict]) -> None:
    """Put the changes the run's resumes made (the `segments` of its settings history) as comments at the top of
    its recipe.yaml; the settings below them stay those the run started with, byte for byte."""
    path = Path(run_dir) / "recipe.yaml"
    lines = path.read_text().splitlines(keepends=True)
    body = "".join(lines[next((i for i, ln in enumerate(lines) if not ln.startswith(_HEADER)), len(lines)):])
    notes = [f"{_HEADER}  {seg.get('kind', 'resume')} {seg.get('segment', '?')} ({seg.get('time', '?')}): "
             + "; ".join(f"{c['key']} {c['old']!r} -> {c['new']!r}" for c in seg["changes"]) + "\n"
             for seg in segments if seg.get("changes")]
    head = [f"{_HEADER}The settings this run started with. Resumes changed some of them (settings_history.json\n",
            f"{_HEADER}and report.json's settings_history say from which phase and epoch each change ran):\n"]
    head = head if notes else []
    atomic_write(path, "".join(head + notes) + body)


def dump_recipe(recipe: Any, path: str | os.PathLike) -> None:
    """Write the resolved recipe as YAML (through a temporary file and a rename)."""
    atomic_write(path, yaml.safe_dump(to_dict(recipe), sort_keys=False))
