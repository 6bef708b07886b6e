"""`slimrarts export RUN_DIR|slim.pt`: the slim model as an ONNX file or a PyTorch 2 exported program, checked on
the run's own test images and recorded in the run folder's `export.json`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write, read_json
from ..api import load
from ..data import make_loaders
from ..deploy import (
    ACTIVATION_TYPES,
    CALIBRATION_METHODS,
    FORMATS,
    check_batch_sizes,
    export,
    onnx_accuracy,
    ort_session,
    quantize_int8,
    runtime_record,
)
from ..engine.rundir import RunDir
from ..errors import InputError, MissingFileError, SlimrartsError
from ..recipe import read_run_recipe
from ..timing import device_timer, time_calls
from ..width import read_slim_spec

__all__ = ["EXPORT_RECORD", "check_images", "export_run"]

EXPORT_RECORD = "export.json"  # in the run folder: a list, one record per export, oldest first
CHECK_IMAGES = 8  # test images the export is checked on, at least


def _locate(target: str | Path) -> tuple[Path, Path | None]:
    """(the slim.pt, its run folder or None): a run folder is a folder holding slim.pt and recipe.yaml."""
    target = Path(target)
    if not target.exists():
        raise MissingFileError(f"{target}: no such run folder or slim.pt")
    slim = target / "slim.pt" if target.is_dir() else target
    if not slim.is_file():
        raise MissingFileError(f"{target} holds no slim.pt: is it the run folder of a finished `slimrarts run`?")
    return slim, slim.parent if (slim.parent / "recipe.yaml").is_file() else None


def _run_loaders(run_dir: Path, eval_batch: int, train_batch: int | None = None):
    """The run's loaders as its recipe.yaml makes them (on the CPU, no download), and the data config."""
    report = read_json(run_dir / "report.json", what="the run's report: ") if (run_dir / "report.json").exists() \
        else {}
    recipe = read_run_recipe(run_dir / "recipe.yaml")
    data = report.get("data") or {}
    if data.get("dataset") != recipe.data.name:
        raise InputError("the run was given its own loaders (report.json names no data set of the recipe), so "
                         "recipe.yaml's data section does not describe its data")
    cfg = dataclasses.replace(recipe.data, eval_batch_size=eval_batch, download=False, workers=0,
                              **({"batch_size": train_batch} if train_batch else {}))
    return make_loaders(cfg, "cpu", seed=recipe.seed, ignore_index=recipe.task.ignore_index), cfg


def check_images(run_dir: Path, n: int) -> tuple[torch.Tensor, str]:
    """The first `n` test images of the run's data, as its test loader gave them to the model (normalised, float), and
    a description; `SlimrartsError`/`OSError` when they cannot be loaded (the data moved, no data section)."""
    loaders, cfg = _run_loaders(run_dir, n)
    images = next(iter(loaders.test))[0].float()
    what = (f"{images.shape[0]} test images of {cfg.name} ({cfg.root or 'its default location'}), through the "
            "run's test loader")
    return images, what


def _inputs(slim: Path, run_dir: Path | None, n: int) -> tuple[torch.Tensor, str]:
    reason = "no run folder (recipe.yaml) beside slim.pt"
    if run_dir is not None:
        try:
            return check_images(run_dir, n)
        except (SlimrartsError, OSError) as err:
            reason = f"the run's test images could not be loaded: {err}"
    shape = (read_slim_spec(slim).get("input_shape") or [1, 3, 32, 32])[1:]
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    return x, f"{n} random normal inputs (seed 0) of the recorded input size {list(shape)}: {reason}"


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[torch.arange(n) % x.shape[0]]


def _int8(path: Path, data: bytes, run_dir: Path, calibration: int, method: str,
          activations: str = "auto") -> dict[str, Any]:
    """Quantize the exported ONNX model on `calibration` training images of the run (as its training loader gives
    them, augmentation included), write it beside the fp32 file (`.int8.onnx`), and measure both in onnxruntime:
    test accuracy (the whole test set) and latency at batch 1 and 64 (interleaved rounds)."""
    loaders, _ = _run_loaders(run_dir, 256, train_batch=min(64, calibration))
    batches, seen = [], 0
    for x, _y in loaders.train:
        batches.append(x.float()[: calibration - seen])
        seen += batches[-1].shape[0]
        if seen >= calibration:
            break
    quantized, record = quantize_int8(data, batches, method=method, activations=activations)
    qpath = path.with_suffix(".int8.onnx")
    atomic_write(qpath, quantized)
    test = [(x.float(), y) for x, y in loaders.test]
    record["file"] = str(qpath)
    record["accuracy"] = {"fp32": onnx_accuracy(data, test), "int8": onnx_accuracy(quantized, test),
                          "split": "test", "note": "onnxruntime, the whole test set; reported, not used to choose"}
    sessions = [ort_session(b) for b in (data, quantized)]
    name = sessions[0].get_inputs()[0].name
    shape = tuple(test[0][0].shape[1:])
    latency = []
    for b in (1, 64):
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        fp32, int8 = time_calls([lambda s=s, x=x: s.run(None, {name: x}) for s in sessions], device_timer("cpu"),
                                rounds=5, repeats=10, warmup=3)
        latency.append({"batch": b, "fp32_s": fp32.median_s, "int8_s": int8.median_s, "fp32_spread": fp32.spread,
                        "int8_spread": int8.spread, "speedup": fp32.median_s / int8.median_s})
    record["latency"] = {"runs": latency, "runtime": runtime_record("onnxruntime")}
    return record


def export_run(target: str | Path, *, format: str = "onnx", out: str | Path | None = None,
               dynamic_batch: bool = False, batch_size: int = 1, int8: bool = False, calibration: int = 256,
               calibration_method: str = "minmax", activations: str = "auto") -> dict[str, Any]:
    """Export the slim model of a run folder (or of a bare `slim.pt`) and check it; returns the check's record.

    The file goes to `out` (default: `slim.onnx` / `slim.pt2` beside slim.pt). It is checked on the run's test
    images (the data set its recipe.yaml names, loaded through `slimrarts.data` as the run did), or, for a bare
    slim.pt or data that cannot be loaded, on random inputs of the recorded input size; the record says which.
    Fixed batch: exported and checked at `batch_size`, on consecutive batches of the images. Dynamic batch:
    checked at `check_batch_sizes(batch_size, True)`. From a run folder, the record is appended to `export.json`.

    `int8`: also the int8 (QDQ) model, calibrated on `calibration` training images of the run (`deploy.
    quantize_int8`), written as `<out>.int8.onnx`, with fp32 and int8 test accuracy and latency in onnxruntime
    (the record's `int8`); needs format onnx and a run folder whose data loads. `activations`: int8, uint8, or
    auto (both tried, the one closer to fp32 on the calibration images kept).
    """
    if format not in FORMATS:
        raise InputError(f"--format {format!r} is not an export format; allowed: {', '.join(FORMATS)}")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be >= 1")
    if int8 and format != "onnx":
        raise InputError(f"--int8 quantizes an ONNX model with onnxruntime; it needs --format onnx, not {format}")
    if int8 and (isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1):
        raise InputError(f"--calibration {calibration!r} must be an integer >= 1 (training images)")
    if calibration_method not in CALIBRATION_METHODS:
        raise InputError(f"--calibration-method {calibration_method!r} is not one of "
                         f"{', '.join(CALIBRATION_METHODS)}")
    if activations not in ACTIVATION_TYPES:
        raise InputError(f"--activations {activations!r} is not one of {', '.join(ACTIVATION_TYPES)}")
    slim, run_dir = _locate(target)
    if int8 and run_dir is None:
        raise InputError(f"--int8 calibrates on the run's training images, but {slim} has no run folder "
                         "(recipe.yaml) beside it")
    traced, sizes = check_batch_sizes(batch_size, dynamic_batch)
    images, what = _inputs(slim, run_dir, max(CHECK_IMAGES, traced, *sizes))
    if dynamic_batch:
        checks = [_rows(images, b) for b in sizes]
    else:
        images = _rows(images, max(batch_size, images.shape[0] // batch_size * batch_size))
        checks = list(images.split(batch_size))
    if not read_slim_spec(slim).get("model"):
        raise InputError(f"{slim} does not record which model it was cut from, so the command line cannot rebuild "
                         "it; from Python: slimrarts.export(slimrarts.load(path, model=YourModel(...)), 'slim.onnx', "
                         "x), with the original, uncut model")
    model = load(slim)
    path = Path(out) if out is not None else slim.with_suffix(f".{format}")
    record = export(model, path, checks[0], format=format, dynamic_batch=dynamic_batch, check_inputs=checks,
                    inputs=what)
    record["source"] = str(slim)
    if int8:
        record["int8"] = _int8(path, path.read_bytes(), run_dir, calibration, calibration_method,
                               activations)
    if run_dir is not None:
        log = run_dir / EXPORT_RECORD
        records = read_json(log, what="the run's export record: ") if log.exists() else []
        if not isinstance(records, list):
            raise InputError(f"{log} is not a list of export records; move it away to record this export")
        RunDir(run_dir).write_json(EXPORT_RECORD, [*records, record])
        record["recorded_in"] = str(log)
    return record
