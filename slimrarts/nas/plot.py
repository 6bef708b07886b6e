"""Draw a genotype's normal and reduction cells as small DAGs with matplotlib (no graphviz)."""

from __future__ import annotations

import os
from pathlib import Path

from .genotypes import Genotype

__all__ = ["draw_cells"]

_OP_COLOURS = {"skip_connect": "tab:red", "max_pool_3x3": "tab:blue", "avg_pool_3x3": "tab:cyan",
               "sep_conv_3x3": "tab:green", "sep_conv_5x5": "tab:olive", "dil_conv_3x3": "tab:purple",
               "dil_conv_5x5": "tab:pink"}


def _positions(steps: int) -> dict[int | str, tuple[float, float]]:
    pos: dict[int | str, tuple[float, float]] = {0: (0.0, 2.0), 1: (0.0, -2.0)}
    for node in range(steps):
        pos[node + 2] = (1.6 + 1.6 * node, 1.2 if node % 2 == 0 else -1.2)
    pos["out"] = (1.6 + 1.6 * steps, 0.0)
    return pos


def _draw_cell(ax, edges, concat, title: str) -> None:
    steps = len(edges) // 2
    pos = _positions(steps)
    labels = {0: "c_{k-2}", 1: "c_{k-1}", **{n + 2: str(n) for n in range(steps)}, "out": "c_{k}"}
    for k, (op, j) in enumerate(edges):
        src, dst = pos[j], pos[k // 2 + 2]
        rad = 0.25 if k % 2 else -0.25
        colour = _OP_COLOURS.get(op, "black")
        ax.annotate("", xy=dst, xytext=src, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.4, shrinkA=14,
                                                            shrinkB=14, connectionstyle=f"arc3,rad={rad}"))
        mx, my = (src[0] + dst[0]) / 2, (src[1] + dst[1]) / 2
        # the midpoint of the arc3 curve is offset from the chord by rad/2 of its length, perpendicular to it
        dx, dy = dst[0] - src[0], dst[1] - src[1]
        mx, my = mx + rad / 2 * dy, my - rad / 2 * dx
        ax.text(mx, my, op, fontsize=7, color=colour, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for n in concat:
        ax.annotate("", xy=pos["out"], xytext=pos[n], arrowprops=dict(arrowstyle="-|>", color="0.6", lw=0.9,
                                                                      shrinkA=14, shrinkB=14, linestyle="--"))
    for key, (x, y) in pos.items():
        face = "lightyellow" if key == "out" else ("lightblue" if key in (0, 1) else "white")
        ax.text(x, y, f"${labels[key]}$" if isinstance(key, str) or key < 2 else labels[key], ha="center",
                va="center", fontsize=9, bbox=dict(boxstyle="round,pad=0.4", fc=face, ec="0.2"))
    ax.set_title(title)
    ax.set_xlim(-0.8, pos["out"][0] + 0.8)
    ax.set_ylim(-3.0, 3.0)
    ax.axis("off")


def draw_cells(genotype: Genotype, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG with the normal cell above the reduction cell; needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing cells needs matplotlib: pip install 'slimrarts[plot]'") from None
    steps = len(genotype.normal) // 2
    fig, axes = plt.subplots(2, 1, figsize=(2.2 + 1.6 * steps, 7.5))
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction cell")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
