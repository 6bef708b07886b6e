"""Timing on a device: the one harness (warm-up, device synchronisation, interleaved rounds, medians), what the device
is called, and where measured latencies are cached.

`time_models` times whole networks (`metrics.measure_latency`, the report, `width.tighten`); `median_time` one
callable (a layer of the width latency tables). Both run through `time_calls`: each callable is warmed up, then
timed `repeats` times per round, all callables in turn in every round, so a drift of the machine's speed (another
process, clocks) touches each the same. A timer `timer(fn, n) -> n seconds` is injectable so that tests are exact;
`device_timer` is the default (CUDA events on CUDA, a wall clock between synchronisations elsewhere).

Imports nothing of slimrarts but `modes`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .modes import evaluating

__all__ = ["Timer", "Timing", "device_name", "device_timer", "latency_cache_dir", "median_time", "time_calls",
           "time_models"]

Timer = Callable[[Callable[[], Any], int], list[float]]


def latency_cache_dir() -> Path:
    """$SLIMRARTS_CACHE/latency, else $XDG_CACHE_HOME/slimrarts/latency, else ~/.cache/slimrarts/latency."""
    if os.environ.get("SLIMRARTS_CACHE"):
        return Path(os.environ["SLIMRARTS_CACHE"]).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "slimrarts" / "latency"


def device_name(device: str | torch.device, *, detail: bool = False) -> str:
    """The device's name: the GPU's (`NVIDIA H100 80GB HBM3`), else the processor's (`x86_64`).

    With `detail`, everything a measured time depends on, for cache keys: `cuda:<name>:sm<major><minor>` or
    `<type>:<processor>:<n>threads`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if not detail:
            return name
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{name}:sm{major}{minor}"
    name = platform.processor() or platform.machine()
    return f"{device.type}:{name}:{torch.get_num_threads()}threads" if detail else name


def device_timer(device: str | torch.device) -> Timer:
    """A function that runs a callable n times and returns the seconds each run took on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":

        def _cuda(fn: Callable[[], Any], n: int) -> list[float]:
            with torch.cuda.device(device):
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
                torch.cuda.synchronize()
                for start, end in zip(starts, ends, strict=True):
                    start.record()
                    fn()
                    end.record()
                torch.cuda.synchronize()
                return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)]

        return _cuda
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None) or (lambda: None)

    def _wall(fn: Callable[[], Any], n: int) -> list[float]:
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    return _wall


@dataclasses.dataclass
class Timing:
    """A callable's time: the median over rounds of each round's median, the spread, and every measurement."""

    median_s: float
    spread: float  # (max − min) / median of the round medians: run-to-run variation
    rounds_s: list[float]
    samples_s: list[float] = dataclasses.field(default_factory=list)  # each call's seconds, round after round


def time_calls(fns: Sequence[Callable[[], Any]], timer: Timer, *, rounds: int = 1, repeats: int = 10,
               warmup: int = 3) -> list[Timing]:
    """Time several callables, interleaved: each is called `warmup` times first, then every round calls each one
    `repeats` times in turn. One `Timing` per callable."""
    if rounds < 1 or repeats < 1 or warmup < 0:
        raise InputError(f"rounds and repeats must be >= 1 and warmup >= 0, got {rounds}, {repeats}, {warmup}")
    for fn in fns:
        if warmup:
            timer(fn, warmup)
    samples: list[list[float]] = [[] for _ in fns]
    medians: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, all_s, round_s in zip(fns, samples, medians, strict=True):
            times = [float(t) for t in timer(fn, repeats)]
            all_s.extend(times)
            round_s.append(float(statistics.median(times)))
    out = []
    for all_s, round_s in zip(samples, medians, strict=True):
        med = float(statistics.median(round_s))
        out.append(Timing(med, (max(round_s) - min(round_s)) / med if med > 0 else 0.0, round_s, all_s))
    return out


def median_time(timer: Timer, fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Seconds of one call of `fn`: the median of `repeats` calls after `warmup` (one round of `time_calls`)."""
    return time_calls([fn], timer, rounds=1, repeats=repeats, warmup=warmup)[0].median_s


def device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter or buffer (CPU if none) and dtype of the first floating one."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floats[0] if floats else torch.get_default_dtype()


def time_models(models: Sequence[nn.Module], input_size: Sequence[int], *, batch_size: int = 1,
                device: str | torch.device | None = None, timer: Timer | None = None, rounds: int = 5,
                repeats: int = 10, warmup: int = 3, channels_last: bool = False) -> list[Timing]:
    """Time several networks on one input, interleaved (see `time_calls`), in eval mode under inference mode; each
    submodule's training flag is restored afterwards.

    The input is `torch.randn((batch_size, *input_size))` in the first model's dtype on `device` (default: the first
    model's; the models must be there already), in channels-last memory with `channels_last` (4-d inputs).
    """
    first_device, dtype = device_and_dtype(models[0])
    device = torch.device(device) if device is not None else first_device
    timer = timer or device_timer(device)
    x = torch.randn((batch_size, *input_size), device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with evaluating(*models), torch.inference_mode():
        return time_calls([lambda model=model: model(x) for model in models], timer, rounds=rounds,
                          repeats=repeats, warmup=warmup)


def speed_report(dense: nn.Module, slim: nn.Module, input_size, cfg, device: torch.device, batch: int,
                 macs: tuple[int, int], *, times: Callable[..., list[Timing]] | None = None,
                 runtime: dict | None = None) -> dict:
    """Measured latency of the dense and the slim model, interleaved, on `device` at batch 1 and `batch` (and on the
    CPU at batch 1 when `device` is not the CPU): medians, run-to-run spread, speed-up, and the share of the MACs
    reduction realised as speed-up (speed-up / MACs factor).

    `times(models, input_size, batch_size=, device=, rounds=, repeats=)` does the timing (default `time_models`:
    eager PyTorch); `runtime` records what it times in (`deploy.runtime_record`), e.g. onnxruntime, which runs on
    the CPU only: then every figure is taken there."""
    times = times or time_models
    runtime = runtime or {"runtime": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}
    batches = cfg.batch_sizes or sorted({1, batch})
    if runtime["runtime"] != "torch":
        plan = [(torch.device("cpu"), b) for b in batches]
    else:
        plan = [(device, b) for b in batches] + ([(torch.device("cpu"), 1)] if device.type != "cpu" else [])
    factor = macs[0] / macs[1] if macs[1] else float("inf")
    out = {"macs_factor": factor, "runtime": runtime, "runs": []}
    for where, b in plan:
        d, s = (m.to(where).eval() for m in (dense, slim))
        td, ts = times([d, s], input_size, batch_size=b, device=where, rounds=cfg.rounds, repeats=cfg.repeats)
        speedup = td.median_s / ts.median_s
        out["runs"].append({"device": str(where), "runtime": runtime["runtime"], "batch": b, "dense_s": td.median_s,
                            "slim_s": ts.median_s, "dense_spread": td.spread, "slim_spread": ts.spread,
                            "speedup": speedup, "realised": speedup / factor})
    dense.to(device)
    slim.to(device)
    return out
