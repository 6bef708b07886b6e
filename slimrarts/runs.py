"""Read run folders back: comparison tables and plots of widths and α."""

from __future__ import annotations

from pathlib import Path

from ._io import read_json
from .errors import FileProblem, InputError, MissingFileError
from .metrics import format_count
from .report import FRACTIONS, markdown_table

__all__ = ["read_report", "compare_runs", "plot_run"]


def read_report(run: Path) -> dict:
    """The report.json of a run folder, with a clear error when it is missing."""
    path = Path(run) / "report.json"
    if not Path(run).is_dir():
        raise MissingFileError(f"{run}: no such run folder" if not Path(run).exists() else
                               f"{run} is a file, not a run folder")
    if path.is_dir():
        raise FileProblem(f"{path} is a folder, not a report")
    if not path.is_file():
        raise MissingFileError(f"{run}: no report.json (has the run finished? resume it with --resume --out {run})")
    report = read_json(path)
    if not isinstance(report, dict):
        raise FileProblem(f"{path} holds a JSON {type(report).__name__}, not a slimrarts report")
    return report


def _pct(v, metric: str = "acc") -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f}" if metric in FRACTIONS else f"{v:.4g}"


def _row(run: Path, r: dict) -> dict:
    kind = r.get("kind")
    if kind == "topology-search":
        return {"run": run.name, "method": f"{r['method']} (cell search)", "acc": "—",
                "params": f"eval net {format_count(r['eval_net']['params'])}",
                "macs": f"skips {r['skip_connections']['normal']}/{r['skip_connections']['reduce']}", "prc": "—",
                "time": f"{r['time_s']['search']:.0f}"}
    if kind == "cell-train":
        return {"run": run.name, "method": "cell eval net (train)", "acc": _pct(r.get("test_acc")),
                "params": format_count(r["params"]), "macs": "—", "prc": "—", "time": f"{r.get('train_s', 0):.0f}"}
    if "method" not in r:  # a `slimrarts train` baseline (its task's headline metric, test_acc before tasks)
        m = r.get("metric", "acc")
        return {"run": run.name, "method": "baseline (train)", "metric": m,
                "acc": _pct(r.get("test_metric", r.get("test_acc")), m),
                "params": format_count(r["params"]), "macs": format_count(r["macs"]), "prc": "—",
                "time": f"{r.get('train_s', 0):.0f}"}
    a, t, m = r["accuracy"], r["time_s"], (r.get("task") or {}).get("metric", "acc")
    return {"run": run.name, "method": r["method"], "mode": r["mode"], "prc": _pct(r["prc"]), "metric": m,
            "acc": _pct(a.get("slim_after_finetune"), m), "acc0": _pct(a.get("slim_before_finetune"), m),
            "dense": _pct(a.get("dense"), m),
            "params": f"{format_count(r['params']['before'])} → {format_count(r['params']['after'])}",
            "macs": f"{format_count(r['macs']['before'])} → {format_count(r['macs']['after'])}",
            "time": f"{t['search']:.0f} + {t['finetune']:.0f}"}


def _checked_row(run: Path) -> dict:
    """The table row of a run; a report.json without a field the table reads, or with a field of the wrong type,
    fails naming the file and the field."""
    report = read_report(run)
    try:
        return _row(run, report)
    except KeyError as err:
        raise FileProblem(f"{run / 'report.json'} has no field {err.args[0]!r}: not a finished slimrarts report "
                          "(or one from another version)") from None
    except (TypeError, ValueError, InputError) as err:
        raise FileProblem(f"{run / 'report.json'}: a field has the wrong type ({err}); the file is damaged or not "
                          "slimrarts' own") from None


def compare_runs(runs: list[Path], plot: bool = False) -> str:
    """A Markdown table comparing runs (the test metric of the final epoch: accuracy, or the task's headline metric,
    named per row), and PNGs beside each run with `plot`."""
    rows = [_checked_row(Path(run)) for run in runs]
    metrics = {r.get("metric", "acc") for r in rows}
    head = [("run", "run"), ("method", "method"), ("PRC %", "prc"), ("test acc % (final)", "acc")]
    before = ("before fine-tune %", "acc0")
    if metrics != {"acc"}:  # segmentation, detection or a user's metric: named in each row, fractions with a %
        head = [("run", "run"), ("method", "method"), ("PRC %", "prc"), ("test metric", "metric"),
                ("test value (final)", "acc")]
        before = ("before fine-tune", "acc0")
        for r in rows:
            for k in ("acc", "acc0"):
                if r.get(k, "—") != "—" and r.get("metric", "acc") in FRACTIONS:
                    r[k] += "%"
    columns = [*head, before, ("params", "params"), ("MACs/image", "macs"), ("search + fine-tune s", "time")]
    if plot:
        for run in runs:
            plot_run(Path(run))
    return markdown_table(rows, columns)


def plot_run(run: Path) -> list[Path]:
    """widths.png (per-layer output channels before/after) and alphas.png (α histogram) in the run folder."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'slimrarts[plot]'") from err
    report = read_report(run)
    out = []
    layers = report.get("layers")
    if layers:
        names = [n for n, w in layers.items() if w["before"][1] != w["after"][1] or w["before"][0] != w["after"][0]]
        names = names or list(layers)
        before = [layers[n]["before"][1] for n in names]
        after = [layers[n]["after"][1] for n in names]
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
        ax.bar(range(len(names)), before, color="#cccccc", label="before")
        ax.bar(range(len(names)), after, color="#1f77b4", label="after")
        ax.set_xlabel("layer (pruned layers, in model order)")
        ax.set_ylabel("output channels")
        ax.set_title(f"{report['method']} · PRC {100 * report['prc']:.1f}%")
        ax.legend()
        fig.tight_layout()
        fig.savefig(run / "widths.png", dpi=120)
        plt.close(fig)
        out.append(run / "widths.png")
    alphas_path = run / "alphas.json"
    if alphas_path.is_file():
        values = [v for group in read_json(alphas_path)["alphas"] for v in group]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist([abs(v) for v in values], bins=60, color="#1f77b4")
        ax.set_xlabel("|α|")
        ax.set_ylabel("channels")
        ax.set_title(f"α after search ({report['method']})")
        fig.tight_layout()
        fig.savefig(run / "alphas.png", dpi=120)
        plt.close(fig)
        out.append(run / "alphas.png")
    return out
