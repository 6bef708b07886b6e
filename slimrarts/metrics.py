"""Model cost: parameters, MACs (torch-pruning's counter) and measured latency.

MACs are multiply-accumulates, not FLOPs: FLOPs = 2 × MACs. Network Slimming's paper reports FLOPs; torch-pruning
and TAS report MACs.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError, InputTypeError
from .modes import evaluating
from .timing import device_and_dtype, device_timer, time_models

__all__ = ["count_macs", "count_params", "device_timer", "format_count", "full_proposals", "macs_and_params",
           "measure_latency"]

_COUNTER_ATTRS = ("start_flops_count", "stop_flops_count", "reset_flops_count", "compute_average_flops_cost")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_shape(value: Any, arg: str, length: int | None = None) -> tuple[int, ...]:
    ok = isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok or not value or (length is not None and len(value) != length):
        what = f"{length} positive ints" if length is not None else "positive ints"
        raise InputError(f"{arg}={value!r} must be a tuple of {what}")
    return tuple(value)


def _frozen_norm_macs(module: nn.Module, inp: tuple, output: torch.Tensor) -> None:
    module.__flops__ += int(np.prod(inp[0].shape)) * 2  # as an affine BatchNorm: a scale and a shift per element


def _extra_counters() -> dict:
    """Modules torch-pruning's counter does not know, counted as the ones they stand for: torchvision's
    FrozenBatchNorm2d (detection backbones) as an affine BatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d

    return {FrozenBatchNorm2d: _frozen_norm_macs}


@contextlib.contextmanager
def _counting_extra() -> Any:
    """Inside the block torch-pruning's counter counts the `_extra_counters` too (its table of custom modules is
    put back as it was after it)."""
    from torch_pruning.utils import op_counter

    table = op_counter.CUSTOM_MODULES_MAPPING
    added = {t: h for t, h in _extra_counters().items() if t not in table}
    table.update(added)
    try:
        yield
    finally:
        for t in added:
            table.pop(t, None)


def is_counted(module: nn.Module) -> bool:
    """Whether the op counter behind `macs_and_params` counts `module` itself (a conv, a norm, an activation, ...)."""
    from torch_pruning.utils import op_counter

    return op_counter.is_supported_instance(module) or type(module) in _extra_counters()


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once); with ``trainable_only``, those requiring grad."""
    _check_model(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def full_proposals(model: nn.Module):
    """While MACs are counted, torchvision's two-stage detectors keep their full number of proposals and
    detections: each `RegionProposalNetwork` and `RoIHeads` suppresses nothing (NMS threshold 1, no score or size
    cut), so the per-region heads run on `post_nms_top_n` proposals (and a mask head on `detections_per_img`
    detections) whatever the weights and the input. Without it their count follows how many proposals survive
    NMS on one random image, which changes with every cut (a Faster R-CNN's box head is most of its MACs)."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    settings = {RegionProposalNetwork: {"nms_thresh": 1.0, "score_thresh": 0.0, "min_size": 0.0},
                RoIHeads: {"nms_thresh": 1.0, "score_thresh": 0.0}}
    saved = []
    for m in model.modules():
        for kind, values in settings.items():
            if isinstance(m, kind):
                saved.append((m, {k: getattr(m, k) for k in values}))
                for k, v in values.items():
                    setattr(m, k, v)
    try:
        yield
    finally:
        for m, values in saved:
            for k, v in values.items():
                setattr(m, k, v)


def macs_and_params(
    model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32), *, example_inputs: Any = None
) -> tuple[int, int]:
    """MACs per sample and parameter count, from torch-pruning's op counter.

    The input is ``torch.randn(input_size)`` (batch dimension included) on the model's device and dtype, or
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) when given.
    torch-pruning's convention: convs and linears count their MACs plus one per bias element, norms count 1 (2 if
    affine; torchvision's FrozenBatchNorm2d as an affine BatchNorm, though its scale and shift are buffers, not
    parameters) per element, activations and pools 1 per element; modules it does not know (custom ops, functional
    calls) count 0; the total is divided by the batch size, but a linear's bias is added once per call, so use
    batch 1 for exact per-sample counts. The count runs on the model itself (no deepcopy, so
    models that cannot be copied work), in eval mode under ``torch.no_grad()``; each module's training flag is
    restored afterwards. A torchvision two-stage detector is counted at its full number of proposals
    (``full_proposals``).
    """
    from torch_pruning.utils import op_counter  # imports timm: deferred so that importing metrics stays cheap

    _check_model(model)
    if example_inputs is None:
        device, dtype = device_and_dtype(model)
        example_inputs = torch.randn(_check_shape(input_size, "input_size"), device=device, dtype=dtype)
    with evaluating(model), _counting_extra(), full_proposals(model):
        try:
            op_counter.add_flops_counting_methods(model)
            model.start_flops_count(ost=sys.stderr, verbose=False, ignore_list=[])
            with torch.no_grad():
                if isinstance(example_inputs, dict):
                    model(**example_inputs)
                elif isinstance(example_inputs, (tuple, list)):
                    model(*example_inputs)
                else:
                    model(example_inputs)
            macs, params, _, _ = model.compute_average_flops_cost()
        finally:
            if "stop_flops_count" in model.__dict__:
                model.stop_flops_count()
            for name in (*_COUNTER_ATTRS, "__batch_counter__"):
                model.__dict__.pop(name, None)
    return int(round(macs)), int(params)


def call_macs(module: nn.Module, inp: torch.Tensor, output: torch.Tensor) -> float:
    """torch-pruning's count for one call of one module it knows (a conv, linear, norm, activation, pool) with input
    `inp` and `output` (meta tensors do: the counter reads only shapes and a few attributes); the batch included."""
    from torch_pruning.utils import op_counter

    hook = (_extra_counters().get(type(module)) or op_counter.CUSTOM_MODULES_MAPPING.get(type(module))
            or op_counter.MODULES_MAPPING[type(module)])
    stand_in = copy.copy(module)  # shallow: the hook only adds to __flops__
    object.__setattr__(stand_in, "__flops__", 0)
    hook(stand_in, (inp,), output)
    return float(stand_in.__flops__)


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32), *, example_inputs: Any = None) -> int:
    """MACs per sample (not FLOPs: FLOPs = 2 × MACs), from torch-pruning's op counter; see ``macs_and_params``."""
    return macs_and_params(model, input_size, example_inputs=example_inputs)[0]


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] = (3, 32, 32),
    *,
    batch_sizes: Iterable[int] = (1, 64),
    device: str | torch.device | None = None,
    warmup: int = 10,
    repeats: int = 50,
    channels_last: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[int, dict[str, float]]:
    """Seconds per forward pass for each batch size: ``{batch: {"median_s", "p10_s", "p90_s", "images_per_s"}}``.

    ``input_size`` is one sample's shape (C, H, W), without the batch dimension. Runs in eval mode under
    ``torch.inference_mode()``, on ``device`` (default: the model's), with inputs and weights in ``dtype`` (default:
    the model's) and, with ``channels_last``, that memory format. When any of these differs from the model as it
    is, a deepcopy is converted and timed, so the model is never changed; otherwise the model itself is timed and
    its training flags are restored. On CUDA each forward is timed with CUDA events; elsewhere with a wall clock
    between device synchronisations. ``images_per_s`` is batch / median.
    """
    _check_model(model)
    shape = _check_shape(input_size, "input_size")
    if len(shape) != 3:
        raise InputError(
            f"input_size={tuple(input_size)!r} must be one sample's (C, H, W) without the batch dimension; "
            "pass batch sizes in batch_sizes"
        )
    batches = _check_shape(tuple(batch_sizes), "batch_sizes")
    for arg, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{arg}={value!r} must be an int >= {low}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InputTypeError(f"dtype={dtype!r} must be a floating torch.dtype (e.g. torch.bfloat16) or None")
    model_device, model_dtype = device_and_dtype(model)
    target = model_device if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    dtype = model_dtype if dtype is None else dtype
    run_model = model
    if target != model_device or dtype != model_dtype or channels_last:
        run_model = copy.deepcopy(model).to(device=target, dtype=dtype)
        if channels_last:
            run_model = run_model.to(memory_format=torch.channels_last)
    timer = device_timer(target)
    results: dict[int, dict[str, float]] = {}
    for batch in batches:
        [timing] = time_models([run_model], shape, batch_size=batch, device=target, timer=timer, rounds=1,
                               repeats=repeats, warmup=warmup, channels_last=channels_last)
        times = np.asarray(timing.samples_s)
        results[batch] = {
            "median_s": timing.median_s,
            "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)),
            "images_per_s": batch / timing.median_s,
        }
    return results


def format_count(n: float, precision: int = 2) -> str:
    """Human-readable count with a K/M/G/T suffix (powers of 1000): ``format_count(1703258) == "1.70M"``."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise InputTypeError(f"n must be a number, got {type(n).__name__} ({n!r})")
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{precision}f}{suffix}"
    return f"{n:.{precision}f}" if isinstance(n, float) else str(n)
