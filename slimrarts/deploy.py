"""Export a model (a slim one, or any other) for deployment, as ONNX or as a PyTorch 2 exported program, and check
the file against PyTorch before it is written.

    record = slimrarts.export(model, "slim.onnx", x, format="onnx", dynamic_batch=True)

`onnx`: `torch.onnx.export(..., dynamo=True)` (the torch.export-based exporter, PyTorch's default since 2.9; the
TorchScript one is deprecated and to be removed) at the fixed opset `OPSET`, one self-contained file; checked in an
onnxruntime `InferenceSession` on the `CPUExecutionProvider`. Needs the `deploy` extra (onnx, onnxruntime,
onnxscript). `pt2`: `torch.export.export` + `torch.export.save`; checked by `torch.export.load(...).module()`. An
exported program is a graph of ATen operators: it loads with torch alone, without slimrarts (the slim model's
`ChannelSelect` becomes an `index_select`).

The check: every check input runs through the PyTorch model (eval mode, no gradients) and through the bytes of the
file; for each output, max |Δ| must be at most `atol + rtol · max|reference|` (fp32: atol = rtol = 1e-4). Only a
file that passes is written (atomically: `_io.atomic_write`); otherwise `ExportMismatchError` names the max |Δ| and
the tolerance. With `dynamic_batch` the batch axis is dynamic (ONNX: a symbolic `batch` dimension; pt2:
`torch.export.Dim("batch", min=1)`) and the file is checked at two batch sizes. This module imports only the
foundation (errors, _io, modes, version) and torch; onnx and onnxruntime are imported when asked for.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._io import atomic_write
from .errors import ExportMismatchError, InputError, InputTypeError, MissingExtraError
from .modes import evaluating
from .version import __version__

__all__ = ["ACTIVATION_TYPES", "ATOL", "CALIBRATION_METHODS", "FORMATS", "OPSET", "RTOL", "RUNTIMES", "OnnxSession",
           "check_batch_sizes", "cpu_flags", "export", "onnx_accuracy", "ort_session", "quantize_int8",
           "require_deploy_extra", "resolve_runtime", "runtime_record", "time_in", "time_onnx"]

FORMATS = ("onnx", "pt2")
OPSET = 18  # the dynamo exporter's own opset (torchlib) on torch 2.14: no version conversion; onnxruntime >= 1.14
ATOL = 1e-4
RTOL = 1e-4  # relative to the largest |output| of the PyTorch model on that input
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
EXPORTER = "torch.onnx.export(dynamo=True)"
RUNTIMES = ("torch", "onnxruntime", "auto")  # what latency is timed in (report.latency.runtime, prune.budget.runtime)
INSTALL_HINT = 'pip install "slimrarts[deploy]"'


def require_deploy_extra(what: str = "format='onnx'") -> dict[str, str]:
    """The versions of onnx, onnxruntime and onnxscript; `MissingExtraError` naming the extra if any is missing."""
    missing, versions = [], {}
    for name in DEPLOY_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            missing.append(name)
            continue
        versions[name] = str(getattr(module, "__version__", None) or importlib.metadata.version(name))
    if missing:
        raise MissingExtraError(f"{what} needs the deploy extra (onnx, onnxruntime, onnxscript; missing: "
                                f"{', '.join(missing)}): {INSTALL_HINT}")
    return versions


def check_batch_sizes(batch: int, dynamic: bool) -> tuple[int, list[int]]:
    """(the batch the export traces at, the batch sizes it is checked at): fixed, `batch` for both; dynamic, traced
    at max(2, batch) (torch.export specialises a dimension of size 1) and checked at `batch` and 2·batch + 1."""
    if not dynamic:
        return batch, [batch]
    return max(2, batch), [batch, 2 * batch + 1]


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`n` rows of `x`, cycling through its rows."""
    return x if x.shape[0] == n else x[torch.arange(n, device=x.device) % x.shape[0]]


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _onnx_bytes(model: nn.Module, x: torch.Tensor, dynamic: bool) -> bytes:
    """The ONNX model of `model` traced at `x`, serialised (weights inside: one file)."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    program = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=OPSET, dynamic_shapes=shapes,
                                input_names=["input"], verbose=False, optimize=True)
    proto = program.model_proto
    try:
        return proto.SerializeToString()
    except ValueError as err:  # protobuf's 2 GiB limit
        raise InputError(f"the ONNX model is too large for one file ({err}); export it as format='pt2'") from None


def _pt2_bytes(model: nn.Module, x: torch.Tensor, dynamic: bool) -> bytes:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes, strict=False)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def ort_session(data: bytes):
    """An onnxruntime CPU session of the ONNX bytes, with as many intra-op threads as torch uses here (and one
    inter-op thread), all graph optimisations on: how the speed figures are taken."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _onnx_runner(data: bytes):
    session = ort_session(data)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().numpy()})]

    return run


def _pt2_runner(data: bytes):
    module = torch.export.load(io.BytesIO(data)).module()

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _leaves(module(x))

    return run


def _excess(check: dict) -> float:
    """max |Δ| in units of its tolerance (above 1: the check fails)."""
    return check["max_abs_diff"] / max(check["tolerance"], 1e-30)


def _compare(reference: list[torch.Tensor], got: list[torch.Tensor], atol: float, rtol: float) -> dict:
    """max |Δ| over the outputs and the tolerance it is held to (the worst output by |Δ| / tolerance)."""
    if len(got) != len(reference):
        return {"max_abs_diff": float("inf"), "max_abs_ref": float("nan"), "tolerance": 0.0,
                "problem": f"{len(got)} outputs instead of {len(reference)}"}
    worst = None
    for ref, out in zip(reference, got, strict=True):
        ref = ref.detach().float().cpu()
        if tuple(out.shape) != tuple(ref.shape):
            return {"max_abs_diff": float("inf"), "max_abs_ref": float("nan"), "tolerance": 0.0,
                    "problem": f"an output of shape {list(out.shape)} instead of {list(ref.shape)}"}
        diff = (out.detach().float().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        entry = {"max_abs_diff": diff if diff == diff else float("inf"), "max_abs_ref": scale,
                 "tolerance": atol + rtol * scale}
        if worst is None or _excess(entry) > _excess(worst):
            worst = entry
    return worst or {"max_abs_diff": 0.0, "max_abs_ref": 0.0, "tolerance": atol}


def _check_args(model, example_input, format, check_inputs, dynamic_batch, atol, rtol) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise InputError(f"format={format!r} is not an export format; allowed: {', '.join(FORMATS)}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise InputTypeError("example_input must be a batch tensor [batch, ...] with at least one row, got "
                             f"{type(example_input).__name__}"
                             f"{list(example_input.shape) if isinstance(example_input, torch.Tensor) else ''}")
    if example_input.dtype != torch.float32:
        raise InputError(f"example_input is {example_input.dtype}; the check's tolerance is for float32 models and "
                         "inputs (convert with model.float() and x.float())")
    if not (atol >= 0 and rtol >= 0):
        raise InputError(f"atol={atol}, rtol={rtol}: tolerances must be >= 0")
    batch = example_input.shape[0]
    if check_inputs is None:
        return [_rows(example_input, b) for b in check_batch_sizes(batch, dynamic_batch)[1]]
    inputs = list(check_inputs)
    row = list(example_input.shape[1:])
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or list(x.shape[1:]) != row:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"check_inputs[{i}] must be a tensor [batch, *{row}] like example_input, got {got}")
        if not dynamic_batch and x.shape[0] != batch:
            raise InputError(f"check_inputs[{i}] has batch {x.shape[0]}; a fixed-batch export runs at the batch of "
                             f"example_input ({batch}) only (dynamic_batch=True for any batch)")
    if not inputs or (dynamic_batch and len({x.shape[0] for x in inputs}) < 2):
        raise InputError("check_inputs must hold at least one batch, and with dynamic_batch=True batches of at "
                         "least two sizes")
    return inputs


def export(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, *, format: str = "onnx",
           dynamic_batch: bool = False, check_inputs: Sequence[torch.Tensor] | None = None, atol: float = ATOL,
           rtol: float = RTOL, inputs: str | None = None) -> dict[str, Any]:
    """Export `model` to `path` as `format` ("onnx" or "pt2"), check the file against PyTorch, write it if it passes.

    Args:
        model: any `nn.Module` taking one batch tensor (e.g. `slimrarts.load(run_dir)` or `PruneResult.model`); run in
            eval mode (its training flags are restored), on its own device.
        path: the file to write (replaced atomically; on any failure the former file stays).
        example_input: a float32 batch the export traces at (fixed batch: the exported batch size).
        dynamic_batch: a dynamic batch axis (ONNX: `batch`; pt2: `torch.export.Dim("batch", min=1)`), traced at
            max(2, batch) and checked at batch and 2·batch + 1 (`check_batch_sizes`) unless `check_inputs` say.
        check_inputs: the batches the file is checked on (default: `example_input`'s rows at the checked sizes).
            Real images are better than random ones: the command line passes test images of the run's data.
        atol, rtol: the check's tolerance, max |Δ| <= atol + rtol · max|PyTorch output| for each output of each
            check input (fp32; default 1e-4 and 1e-4).
        inputs: how the check inputs were made, for the record.

    Returns:
        The check's record: `format`, `file`, `exporter`, `opset` (onnx), `runtime`, the versions of torch,
        onnx, onnxruntime and onnxscript (onnx), `inputs`, `input_shape`, `dynamic_batch`, `traced_batch`,
        `batch_sizes` checked, `max_abs_diff`, `tolerance` (`atol`, `rtol`) and one entry per check in `checks`.

    Raises:
        MissingExtraError: format="onnx" without onnx, onnxruntime or onnxscript (`pip install "slimrarts[deploy]"`).
        ExportMismatchError: the file's outputs differ from PyTorch's beyond the tolerance (nothing written).
        InputError, InputTypeError: a bad argument.
    """
    checks_in = _check_args(model, example_input, format, check_inputs, dynamic_batch, atol, rtol)
    versions = require_deploy_extra() if format == "onnx" else {}
    device = _device(model)
    batch = example_input.shape[0]
    traced = check_batch_sizes(batch, dynamic_batch)[0]
    x = _rows(example_input, traced).to(device)
    with evaluating(model), torch.no_grad():
        data = (_onnx_bytes if format == "onnx" else _pt2_bytes)(model, x, dynamic_batch)
        run = (_onnx_runner if format == "onnx" else _pt2_runner)(data)
        checks = []
        for xc in checks_in:
            xc = xc.to(device)
            result = _compare(_leaves(model(xc)), run(xc), atol, rtol)
            checks.append({"batch_size": int(xc.shape[0]), **result})
    worst = max(checks, key=_excess)
    for c in checks:
        if c.get("problem") or not c["max_abs_diff"] <= c["tolerance"]:
            what = c.get("problem") or f"max |Δ| {c['max_abs_diff']:.3g} > tolerance {c['tolerance']:.3g}"
            raise ExportMismatchError(
                f"the {format} export does not compute what the PyTorch model computes at batch {c['batch_size']}: "
                f"{what} (atol {atol:g} + rtol {rtol:g} × max|output| {c['max_abs_ref']:.3g}); {path} was not "
                "written" + (" (try format='pt2')" if format == "onnx" else ""))
    atomic_write(path, data)
    record = {
        "format": format, "file": str(path), "bytes": len(data),
        "exporter": EXPORTER if format == "onnx" else "torch.export.export(strict=False)",
        "opset": OPSET if format == "onnx" else None,
        "runtime": "onnxruntime InferenceSession (CPUExecutionProvider)" if format == "onnx"
        else "torch.export.load(...).module()",
        "torch": torch.__version__, **versions, "slimrarts": __version__,
        "inputs": inputs or f"example_input rows (batch {batch}), cycled to each checked batch size",
        "input_shape": [int(s) for s in example_input.shape[1:]], "device": str(device),
        "dynamic_batch": bool(dynamic_batch), "traced_batch": int(traced),
        "batch_sizes": sorted({c["batch_size"] for c in checks}),
        "max_abs_diff": worst["max_abs_diff"], "tolerance": worst["tolerance"], "atol": atol, "rtol": rtol,
        "checks": checks,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return record


# ---- timing in the runtime that ships ----------------------------------------------------------------------------


def resolve_runtime(runtime: str, device: str | torch.device, field: str = "runtime") -> str:
    """The runtime latency is timed in: `torch` (eager PyTorch, under inference mode) or `onnxruntime` (the model
    exported as `slimrarts export` does, run by onnxruntime's CPU provider). `auto` is onnxruntime where the timing
    device is the CPU and the deploy extra is installed, else torch. `field` names the setting in errors."""
    if runtime not in RUNTIMES:
        raise InputError(f"{field}: {runtime!r} is not a runtime; choose one of {', '.join(RUNTIMES)}")
    dev = torch.device(device)
    if runtime == "auto":
        if dev.type != "cpu":
            return "torch"
        try:
            require_deploy_extra(f"{field}=auto")
        except MissingExtraError:
            return "torch"
        return "onnxruntime"
    if runtime == "onnxruntime":
        if dev.type != "cpu":
            raise InputError(f"{field}=onnxruntime times on onnxruntime's CPU provider, but the timing device is "
                             f"{dev}: time on the CPU (the device setting next to it: cpu) or use runtime torch")
        require_deploy_extra(f"{field}=onnxruntime")
    return runtime


def runtime_record(runtime: str) -> dict[str, Any]:
    """What a latency figure was taken in: the runtime, its version, the threads, and for onnxruntime the exporter,
    the opset, the provider and the graph optimisation level (recorded with every figure)."""
    if runtime == "torch":
        return {"runtime": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
                "mode": "eager, torch.inference_mode"}
    versions = require_deploy_extra(f"runtime {runtime}")
    return {"runtime": "onnxruntime", "version": versions["onnxruntime"], "threads": torch.get_num_threads(),
            "provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL", "exporter": EXPORTER,
            "opset": OPSET, "dynamic_batch": True, "onnx": versions["onnx"], "torch": torch.__version__}


class OnnxSession:
    """A CPU copy of `model` exported to ONNX (dynamic batch, as `slimrarts export --dynamic-batch` writes it) in an
    onnxruntime session, checked once against PyTorch (`ExportMismatchError` beyond the export tolerance).
    `session(x)` runs a numpy batch; `bytes` is the ONNX file, `model` the (CPU) module it was exported from."""

    def __init__(self, model: nn.Module, input_size: Sequence[int]):
        require_deploy_extra("timing in onnxruntime")
        x = torch.randn((2, *input_size))
        cpu = model if _device(model).type == "cpu" else _cpu_copy(model)
        self.model = cpu
        with evaluating(cpu), torch.no_grad():
            self.bytes = _onnx_bytes(cpu, x, True)
            self.session = ort_session(self.bytes)
            self.name = self.session.get_inputs()[0].name
            check = _compare(_leaves(cpu(x)), [torch.from_numpy(o) for o in self(x.numpy())], ATOL, RTOL)
        if check.get("problem") or not check["max_abs_diff"] <= check["tolerance"]:
            what = check.get("problem") or f"max |Δ| {check['max_abs_diff']:.3g} > {check['tolerance']:.3g}"
            raise ExportMismatchError(f"the ONNX export timed in onnxruntime does not compute what the model "
                                      f"computes ({what}); time it in runtime torch")

    def __call__(self, x):
        return self.session.run(None, {self.name: x})


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu()


def time_onnx(models: Sequence[nn.Module], input_size: Sequence[int], *, batch_size: int = 1, timer=None,
              rounds: int = 5, repeats: int = 10, warmup: int = 3, sessions: dict | None = None, **_ignored):
    """`timing.time_models` in onnxruntime: each model exported (once per `sessions` cache: id(model) → session)
    and timed on one random float32 batch, interleaved, with a wall clock (or the injected `timer`)."""
    import numpy as np

    from .timing import device_timer, time_calls

    cache = sessions if sessions is not None else {}
    runs = []
    for model in models:
        if id(model) not in cache:
            cache[id(model)] = (model, OnnxSession(model, input_size))  # the model is kept so its id stays its own
        runs.append(cache[id(model)][1])
    x = np.random.default_rng(0).standard_normal((batch_size, *input_size), dtype=np.float32)
    return time_calls([lambda run=run: run(x) for run in runs], timer or device_timer("cpu"), rounds=rounds,
                      repeats=repeats, warmup=warmup)


def time_in(runtime: str, models: Sequence[nn.Module], input_size: Sequence[int], **kw):
    """Time `models` in `runtime` ("torch": `timing.time_models`; "onnxruntime": `time_onnx`)."""
    from .timing import time_models

    if runtime == "onnxruntime":
        return time_onnx(models, input_size, **kw)
    kw.pop("sessions", None)
    return time_models(models, input_size, **kw)


# ---- prune, then quantize ----------------------------------------------------------------------------------------

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products that accumulate without 16-bit saturation


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class _Batches:
    """onnxruntime's `CalibrationDataReader` protocol over float32 batches: `get_next()` → {input: batch} or None."""

    def __init__(self, name: str, batches):
        self.name, self.batches = name, iter(batches)

    def get_next(self):
        x = next(self.batches, None)
        if x is None:
            return None
        return {self.name: (x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x)}


ACTIVATION_TYPES = ("auto", "int8", "uint8")


def _agreement(session, reference, name: str, batches: list) -> dict[str, float]:
    """How closely `session` follows the fp32 `reference` session on `batches` (first output): mean |Δ| over mean
    |fp32|, and the share of rows whose arg-max agrees (classifier-shaped outputs)."""
    import numpy as np

    diff = scale = agree = rows = 0.0
    for x in batches:
        feed = {name: x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x}
        a, b = reference.run(None, feed)[0], session.run(None, feed)[0]
        diff += float(np.abs(a - b).sum())
        scale += float(np.abs(a).sum())
        if a.ndim == 2:
            agree += float((a.argmax(1) == b.argmax(1)).sum())
            rows += a.shape[0]
    out = {"relative_error": diff / scale if scale > 0 else float("inf")}
    if rows:
        out["top1_agreement"] = agree / rows
    return out


# On x86 onnxruntime's int8 convolutions are built around u8 × s8 (VPMADDUBSW / VNNI): U8S8 ran ×1.2–×4.7 faster
# than S8S8 on an AMD EPYC (benchmarks/int8_speed.py), S8S8 slower than fp32. There `auto` keeps signed activations
# only when their error is below this share of the unsigned ones'.
SIGNED_MARGIN_X86 = 0.5


def _choose_activations(choice: dict[str, dict], *, x86: bool) -> str:
    """`auto`'s pick among the tried activation types: the one closer to fp32 on the calibration batches; on x86
    unsigned unless signed is clearly closer (`SIGNED_MARGIN_X86`)."""
    errors = {k: v["relative_error"] for k, v in choice.items()}
    if x86 and errors.keys() == {"int8", "uint8"}:
        return "int8" if errors["int8"] < SIGNED_MARGIN_X86 * errors["uint8"] else "uint8"
    return min(errors, key=errors.get)


def quantize_int8(data: bytes, calibration, *, per_channel: bool = True, reduce_range: bool | None = None,
                  method: str = "minmax", activations: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """Static int8 quantization (QDQ) of the ONNX model `data` with onnxruntime, calibrated on the float32 input
    batches `calibration` (training images: the test set chooses nothing); returns the quantized ONNX bytes and
    the settings used.

    The model is first pre-processed as onnxruntime advises (`quant_pre_process`: symbolic shape inference and
    graph optimisation). Weights are signed int8, per output channel with `per_channel` (a pruned network's folded
    conv weights differ widely between channels). Activations are signed (`int8`: S8S8, onnxruntime's QDQ default)
    or unsigned (`uint8`: U8S8) int8; `auto` quantizes both and keeps the one whose outputs on the calibration
    batches are closer to the fp32 model's (relative mean |Δ|; both figures are in the record) — on x86, where
    onnxruntime's int8 kernels are U8S8 and S8S8 runs slower than fp32, unsigned unless signed's error is below
    half of unsigned's (`SIGNED_MARGIN_X86`). A pruned network
    can hold a channel whose BatchNorm scales a near-constant signal up ~100x; there one of the two can lose half
    the accuracy while the other keeps it (the demo's slim ResNet-20: 36% in S8S8, 83% in U8S8, fp32 83.4%).
    `reduce_range` (7-bit weights) defaults to on only where the CPU lacks VNNI: there onnxruntime's x86 int8
    kernels multiply u8 × s8 with VPMADDUBSW, whose 16-bit pair sums can saturate, and its documentation suggests
    reduce_range (or U8U8) when accuracy drops. `method`: the calibration's range estimate (`minmax`, `entropy`,
    `percentile`).
    """
    require_deploy_extra("int8 quantization")
    if method not in CALIBRATION_METHODS:
        raise InputError(f"calibration method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    if activations not in ACTIVATION_TYPES:
        raise InputError(f"int8 activations {activations!r} is not one of {', '.join(ACTIVATION_TYPES)}")
    import tempfile

    import onnxruntime
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    flags = cpu_flags()
    vnni = sorted(flags & set(_VNNI))
    reduce = (not vnni) if reduce_range is None else bool(reduce_range)
    batches = list(calibration)
    if not batches:
        raise InputError("int8 quantization needs at least one calibration batch")
    calibrate = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                 "percentile": q.CalibrationMethod.Percentile}[method]
    kinds = {"int8": q.QuantType.QInt8, "uint8": q.QuantType.QUInt8}
    tried = ("int8", "uint8") if activations == "auto" else (activations,)
    results: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="slimrarts-int8-") as tmp:
        fp32, pre = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx"))
        with open(fp32, "wb") as f:
            f.write(data)
        quant_pre_process(fp32, pre, skip_symbolic_shape=False)
        name = onnxruntime.InferenceSession(pre, providers=["CPUExecutionProvider"]).get_inputs()[0].name
        for kind in tried:
            out = os.path.join(tmp, f"{kind}.onnx")
            q.quantize_static(pre, out, _Batches(name, batches), quant_format=q.QuantFormat.QDQ,
                              per_channel=per_channel, reduce_range=reduce, activation_type=kinds[kind],
                              weight_type=q.QuantType.QInt8, calibrate_method=calibrate)
            with open(out, "rb") as f:
                results[kind] = f.read()
    choice: dict[str, dict] = {}
    if len(tried) > 1:
        reference = ort_session(data)
        choice = {kind: _agreement(ort_session(results[kind]), reference, name, batches) for kind in tried}
    chosen = _choose_activations(choice, x86="avx2" in flags) if choice else tried[0]
    quantized = results[chosen]
    record = {"format": "QDQ", "activations": f"{chosen} ({'signed' if chosen == 'int8' else 'unsigned'})",
              "activation_type": chosen, "activations_asked": activations, "activation_choice": choice,
              "weights": "int8 (signed)", "per_channel": per_channel,
              "reduce_range": reduce, "calibration_method": method,
              "calibration_images": int(sum(b.shape[0] for b in batches)), "preprocess": "quant_pre_process",
              "cpu_vnni": vnni, "cpu_avx2": "avx2" in flags, "cpu_avx512": "avx512f" in flags,
              "onnxruntime": str(onnxruntime.__version__), "bytes": len(quantized), "fp32_bytes": len(data)}
    return quantized, record


def onnx_accuracy(data: bytes, batches) -> dict[str, float]:
    """Top-1 accuracy of the ONNX classifier `data` in onnxruntime over (images, labels) batches."""
    session = ort_session(data)
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        logits = session.run(None, {name: x.detach().cpu().float().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y.cpu()).sum())
        total += int(y.shape[0])
    return {"acc": correct / total if total else float("nan"), "images": total}
