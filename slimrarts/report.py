"""Human-readable summaries of pruning reports: a rich table, and Markdown rows for comparisons."""

from __future__ import annotations

from rich.table import Table

from .metrics import format_count

__all__ = ["summary_table", "markdown_table"]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def summary_table(report: dict) -> Table:
    """Before/after table of one run: params, MACs, test accuracy, PRC and time."""
    t = Table(title=f"slimrarts · {report['method']} ({report['method_note']}) · mode {report['mode']} · "
                    f"scope {'+'.join(report['scope'])}")
    t.add_column("", style="bold")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    p, m, a = report["params"], report["macs"], report["accuracy"]
    t.add_row("params", format_count(p["before"]), format_count(p["after"]), f"-{_pct(p['reduction'])}")
    t.add_row("MACs / image", format_count(m["before"]), format_count(m["after"]), f"-{_pct(m['reduction'])}")
    t.add_row("gated channels", str(report["gated_channels"]), str(report["gated_channels"] - report["pruned_channels"]),
              f"PRC {_pct(report['prc'])}")
    t.add_row("test acc, dense → searched", _pct(a["dense"]), _pct(a["searched"]), "")
    t.add_row("test acc, slim → fine-tuned", _pct(a["slim_before_finetune"]), _pct(a["slim_after_finetune"]),
              "final epoch")
    ts = report["time_s"]
    t.add_row("time search / fine-tune", f"{ts['search']:.1f} s", f"{ts['finetune']:.1f} s", "")
    t.add_row("removal check (max |Δ|)", "", f"{report['removal_max_abs_diff']:.1e}", "")
    return t


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table from dict rows; `columns` is (header, key) pairs."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
