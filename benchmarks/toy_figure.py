"""Trajectories of darts1, milenas and rarts on the paper's solvable model (§III-D, like its Fig. 1).

    python benchmarks/toy_figure.py            # needs the `plot` extra (matplotlib)

All start at (α, w, y) = (2, −2, 0) with plain SGD at lr 0.01 for every variable, the same search code that trains
networks. Writes results/toy_trajectories.png and results/toy.json (final points and the eq. (13)–(15) equilibria).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from slimrarts.toy import rarts_equilibrium, solve  # noqa: E402

STEPS = 3000
INIT = (2.0, -2.0, 0.0)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"darts1": solve("darts1", lr=0.01, steps=STEPS, init=INIT),
            "milenas (λ=1)": solve("milenas", lam=1.0, lr=0.01, steps=STEPS, init=INIT),
            "rarts (λ=β=10)": solve("rarts", lam=10, beta=10, lr=0.01, steps=STEPS, init=INIT)}
    sweep = {f"rarts λ={lam:g} β={beta:g}": solve("rarts", lam=lam, beta=beta, lr=0.01, steps=STEPS, init=INIT)
             for lam, beta in [(10, 2), (10, 5), (10, 10), (15, 15), (2, 10)]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, group, title in ((axes[0], runs, "first-order DARTS, MiLeNAS and RARTS"),
                             (axes[1], sweep, "RARTS for several (λ, β)")):
        for name, r in group.items():
            t = r.trajectory
            ax.plot(t[:, 1], t[:, 0], label=f"{name} → ({r.w:.3f}, {r.alpha:.3f})")
            ax.plot(t[-1, 1], t[-1, 0], "o", ms=4)
        ax.plot([1], [1], "k*", ms=12, label="bilevel minimiser (1, 1)")
        ax.plot([2], [2], "rx", ms=10, label="spurious point (2, 2)")
        ax.plot([INIT[1]], [INIT[0]], "ks", ms=5, label="start (w, α) = (−2, 2)")
        ax.set_xlabel("w")
        ax.set_ylabel("α")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "toy_trajectories.png"
    fig.savefig(png, dpi=120)
    finals = {name: {"alpha": r.alpha, "w": r.w, "y": r.y} for name, r in {**runs, **sweep}.items()}
    eq = {f"lam={lam:g},beta={beta:g}": dict(zip(("alpha", "w", "y"), rarts_equilibrium(lam, beta), strict=True))
          for lam, beta in [(10, 2), (10, 5), (10, 10), (15, 15), (2, 10)]}
    path = write_result("toy", {"command": " ".join(sys.argv), "steps": STEPS, "init": INIT, "lr": 0.01,
                                "final": finals, "equilibrium_eq13_15": eq})
    for name, f in finals.items():
        print(f"| {name} | {f['alpha']:.4f} | {f['w']:.4f} | {'—' if f['y'] is None else format(f['y'], '.4f')} |")
    print(f"wrote {png} and {path}")


if __name__ == "__main__":
    main()
