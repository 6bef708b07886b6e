"""The pruning report: `build_report` assembles it (one place), `summary_table` shows it, `markdown_table` compares.

A report is a plain dict, written as `report.json`; its keys are listed in `build_report`'s docstring.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from rich.table import Table

from .config import set_by_path, to_dict
from .engine import dist
from .metrics import format_count
from .timing import device_name
from .version import __version__

__all__ = ["build_report", "machine_info", "markdown_table", "starting_settings", "summary_table"]


def machine_info(device: torch.device) -> dict:
    """Device, its name, torch version, CPU threads, and the processes the run used (world size, backend)."""
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "processes": dist.describe()}


def _change(before: int, after: int) -> dict:
    return {"before": before, "after": after, "reduction": 1 - after / before if before else 0.0}


def build_report(*, method, recipe, gates, keep, spec: dict, cost_before: tuple[int, int],
                 cost_after: tuple[int, int], input_size: list[int], accuracy: dict, test_loss: float | None,
                 search, finetune, total_s: float, device: torch.device, note: str = "",
                 data: dict | None = None, budget: dict | None = None, latency: dict | None = None,
                 history: list[dict] | None = None) -> dict[str, Any]:
    """The report of one pruning run.

    Keys: `slimrarts` (version), `method`, `method_note` (its source, or what a baseline did), `mode`, `scope`,
    `ratio_requested`, `prc` (pruned / gated channels), `gated_channels`, `pruned_channels`, `params` and `macs`
    (`before`, `after`, `reduction`; MACs per image at `input_size`), `accuracy` (`dense`, `searched`, `masked`,
    `slim_stale_bn` (the cut with the running statistics it had), `slim_before_finetune` (the cut after BatchNorm
    recalibration on `recalibrated_batches` training batches; the same as `slim_stale_bn` when that is 0),
    `slim_after_finetune`: test accuracy, final epochs), `test_loss_final`,
    `removal_max_abs_diff`, `time_s` and images/s of the search (or sparsity) phase and of fine-tuning, `groups`
    (name, scope, size, sites, kept), `skipped` (groups left whole, with reasons), `layers` (widths before/after),
    `settings` (the resolved recipe the run started with), `settings_history` (with a run folder: each start and
    resume of the run, the phase and epoch it continued from and the settings it changed, so which epochs ran under
    which values; see `engine.rundir.RunDir.history`), `machine`, `data` (when the loaders describe it), `budget`
    (mode budget, or ℓ1 with a budget: what was asked, the floor, predicted and achieved cost) and `latency`
    (measured dense and slim time per forward, spread, speed-up, and the share of the MACs reduction realised as
    speed-up).

    `search` and `finetune` are `PhaseResult`s (`search` None for a one-shot criterion).
    """
    p = recipe.prune
    repeats = gates.repeats
    pruned = sum(int((~k).sum()) * r for k, r in zip(keep, repeats, strict=True))
    gated = gates.num_channels
    report = {
        "slimrarts": __version__,
        "method": method.name,
        "method_note": note or method.source,
        "mode": p.mode,
        "scope": p.scope,
        "ratio_requested": p.ratio if p.mode == "ratio" else None,
        "prc": pruned / gated if gated else 0.0,
        "gated_channels": gated,
        "pruned_channels": pruned,
        "params": _change(cost_before[1], cost_after[1]),
        "macs": dict(_change(cost_before[0], cost_after[0]), input_size=list(input_size),
                     note="MACs per image; FLOPs = 2 x MACs"),
        "accuracy": accuracy,
        "test_loss_final": test_loss,
        "removal_max_abs_diff": spec.get("max_abs_diff"),
        "time_s": {"search": search.train_s if search else 0.0, "search_wall": search.wall_s if search else 0.0,
                   "finetune": finetune.train_s, "finetune_wall": finetune.wall_s, "total_this_call": total_s},
        "search_images_per_s": search.images_per_s if search else None,
        "finetune_images_per_s": finetune.images_per_s,
        "groups": [dict(g, kept=len(s["kept"])) for g, s in zip(gates.summary(), spec["groups"], strict=True)],
        "skipped": [{"name": s.name, "reason": s.reason, "channels": s.channels, "kind": s.kind}
                    for s in [*gates.skipped, *gates.out_of_scope]],
        "budget": budget,
        "latency": latency,
        "layers": spec["layers"],
        "settings": starting_settings(to_dict(recipe), history or []),
        "machine": machine_info(device),
        "final_epoch_note": "accuracies are of the final epoch; the test set chooses nothing",
    }
    if history is not None:
        report["settings_history"] = history
    if data:
        report["data"] = data
    return report


def starting_settings(settings: dict, history: list[dict]) -> dict:
    """`settings` (those the last segment of a run ran with) as the run started: every change its resumes made
    (the segments of `history`) undone, latest first."""
    out = copy.deepcopy(settings)
    for segment in reversed(history):
        for change in reversed(segment.get("changes", [])):
            set_by_path(out, change["key"], change["old"])
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


FRACTIONS = frozenset({"acc", "pixel_acc", "miou", "map", "map_50"})  # built-in metrics in [0, 1], shown in %


def format_metric(name: str, v: float | None) -> str:
    """A task metric as a person reads it: the built-in fractions (accuracy, mIoU, mAP) in %, a user's metric as
    it is."""
    if v is None:
        return "—"
    return _pct(v) if name in FRACTIONS else f"{v:.4g}"


def metric_label(name: str) -> str:
    """The headline metric's name in tables: `acc` reads "test acc", `miou` "test mIoU", `map_50` "test mAP@.5"."""
    return "test " + {"miou": "mIoU", "map": "mAP", "map_50": "mAP@.5", "pixel_acc": "pixel acc"}.get(name, name)


def summary_table(report: dict) -> Table:
    """Before/after table of one run: params, MACs, the task's headline test metric, PRC and time."""
    t = Table(title=f"slimrarts · {report['method']} ({report['method_note']}) · mode {report['mode']} · "
                    f"scope {'+'.join(report['scope'])}")
    t.add_column("", style="bold")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    p, m, a = report["params"], report["macs"], report["accuracy"]
    t.add_row("params", format_count(p["before"]), format_count(p["after"]), f"-{_pct(p['reduction'])}")
    t.add_row("MACs / image", format_count(m["before"]), format_count(m["after"]), f"-{_pct(m['reduction'])}")
    gated = report["gated_channels"]
    t.add_row("gated channels", str(gated), str(gated - report["pruned_channels"]), f"PRC {_pct(report['prc'])}")
    name = (report.get("task") or {}).get("metric", "acc")
    label, f = metric_label(name), (lambda v: format_metric(name, v))
    t.add_row(f"{label}, dense → searched", f(a["dense"]), f(a["searched"]), "")
    if a.get("recalibrated_batches"):
        t.add_row(f"{label}, cut → BN recalibrated", f(a.get("slim_stale_bn")), f(a["slim_before_finetune"]),
                  f"{a['recalibrated_batches']} batches")
    t.add_row(f"{label}, slim → fine-tuned", f(a["slim_before_finetune"]), f(a["slim_after_finetune"]),
              "final epoch")
    ts = report["time_s"]
    t.add_row("time search / fine-tune", f"{ts['search']:.1f} s", f"{ts['finetune']:.1f} s", "")
    b = report.get("budget")
    if b:
        fmt = (lambda v: f"{1e3 * v:.2f} ms") if b["kind"] == "latency" else format_count
        done = b.get("achieved")
        t.add_row(f"budget ({b['kind']}, kept)", f"≤ {fmt(b['target_abs'])}", fmt(done) if done is not None else "—",
                  f"{'met' if b.get('met') else 'missed'} · floor {b['floor_fraction']:.0%}")
    for run in (report.get("latency") or {}).get("runs", []):
        t.add_row(f"latency {run['device']}{' ' + run['runtime'] if run.get('runtime', 'torch') != 'torch' else ''} "
                  f"batch {run['batch']}", f"{1e3 * run['dense_s']:.2f} ms",
                  f"{1e3 * run['slim_s']:.2f} ms",
                  f"×{run['speedup']:.2f} ({run['realised']:.0%} of MACs ×{report['latency']['macs_factor']:.2f})")
    t.add_row("removal check (max |Δ|)", "", f"{report['removal_max_abs_diff']:.1e}", "")
    return t


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table from dict rows; `columns` is (header, key) pairs."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
