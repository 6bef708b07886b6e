"""Table 5 of the RARTS paper, at a chosen tier: test error (final epoch), params, MACs, PRC, search/fine-tune time.

    python benchmarks/width_table.py --tier mini --dataset cifar10 --methods baseline slimming rarts random \
        --ratios 0.4 0.6 --seeds 0 1

Each (method, ratio, seed) is one `slimrarts.prune` run of recipes/width/<tier>[_<dataset>].yaml with the method,
ratio and seed overridden, in runs/width/<tier>-<dataset>/<method>-<ratio>-s<seed> (reused if already finished).
`baseline` trains the unpruned model with the recipe's `train` section; `random` prunes random channels at the
per-group counts of the rarts run of the same ratio and seed when there is one, else at the global ratio.
Results go to benchmarks/results/width_<tier>_<dataset>.json; the Markdown table is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_baseline, run_prune, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _recipe_path(tier: str, dataset: str) -> Path:
    for name in (f"{tier}_{dataset}.yaml", f"{tier}.yaml"):
        p = ROOT / "recipes" / "width" / name
        if p.is_file():
            return p
    raise SystemExit(f"no recipe for tier {tier!r} and dataset {dataset!r} in recipes/width/")


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Table-5-shaped Markdown, one line per (method, ratio), mean ± std over seeds."""
    keys = []
    for r in rows:
        k = (r["method"], r.get("ratio"))
        if k not in keys:
            keys.append(k)
    out = ["| method | PRC (%) | test error (%) | params | params ↓ | MACs/image | MACs ↓ | search s | fine-tune s "
           "| seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, ratio in keys:
        rs = [r for r in rows if r["method"] == method and r.get("ratio") == ratio]
        err = [1 - r["acc"] for r in rs]
        first = rs[0]
        prc = _fmt([r["prc"] for r in rs], digits=1) if method != "baseline" else "—"
        out.append(f"| {method} | {prc} | {_fmt(err)} | {first['params'] / 1e6:.3f}M | "
                   f"{_fmt([r['params_red'] for r in rs], digits=1)} | {first['macs'] / 1e6:.1f}M | "
                   f"{_fmt([r['macs_red'] for r in rs], digits=1)} | {statistics.fmean(r['search_s'] for r in rs):.0f}"
                   f" | {statistics.fmean(r['finetune_s'] for r in rs):.0f} | {len(rs)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="mini", choices=["mini", "gpu", "paper"])
    ap.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    ap.add_argument("--methods", nargs="+", default=["baseline", "slimming", "rarts", "random"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.4, 0.6])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "width"), help="where run folders go")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--random-global", action="store_true",
                    help="random pruning at a global ratio instead of the per-layer counts of the rarts run")
    args = ap.parse_args()

    from slimrarts.engine import resolve_device
    from slimrarts.recipe import load_recipe

    recipe_path = _recipe_path(args.tier, args.dataset)
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            for ratio in ([None] if method == "baseline" else args.ratios):
                tag = "baseline" if ratio is None else f"{method}-{int(round(ratio * 100))}"
                run_dir = Path(args.runs) / f"{args.tier}-{args.dataset}" / f"{tag}-s{seed}"
                over = [f"data.name={args.dataset}", f"seed={seed}", *args.overrides]
                if ratio is not None:
                    over += [f"search.method={method}", f"prune.ratio={ratio}"]
                    ref = Path(args.runs) / f"{args.tier}-{args.dataset}" / f"rarts-{int(round(ratio * 100))}-s{seed}"
                    if method == "random" and not args.random_global:
                        if not (ref / "width_spec.json").is_file():
                            raise SystemExit(f"random at RARTS' widths needs the rarts run {ref} (list rarts before "
                                             "random in --methods), or pass --random-global for a global ratio")
                        over.append(f"prune.reference={ref}")
                recipe = load_recipe(recipe_path, over)
                print(f"== {tag} seed {seed}: {run_dir}", flush=True)
                if ratio is None:
                    rep = run_baseline(recipe, run_dir, args.progress)
                    row = {"method": "baseline", "ratio": None, "seed": seed, "acc": rep["test_acc"],
                           "prc": 0.0, "params": rep["params"], "macs": rep["macs"], "params_red": 0.0,
                           "macs_red": 0.0, "search_s": 0.0, "finetune_s": rep["train_s"]}
                else:
                    rep = run_prune(recipe, run_dir, args.progress)
                    row = {"method": method, "ratio": ratio, "seed": seed,
                           "acc": rep["accuracy"]["slim_after_finetune"], "prc": rep["prc"],
                           "params": rep["params"]["after"], "macs": rep["macs"]["after"],
                           "params_red": rep["params"]["reduction"], "macs_red": rep["macs"]["reduction"],
                           "search_s": rep["time_s"]["search"], "finetune_s": rep["time_s"]["finetune"],
                           "acc_before_finetune": rep["accuracy"]["slim_before_finetune"],
                           "random_reference": recipe.prune.reference}
                row["run"] = str(run_dir)
                rows.append(row)
                print(f"   test acc {row['acc']:.4f}  prc {row['prc']:.3f}", flush=True)
    device = resolve_device(load_recipe(recipe_path).device)
    md = table(rows)
    path = write_result(f"width_{args.tier}_{args.dataset}", {"command": " ".join(sys.argv),
                                                              "recipe": str(recipe_path.relative_to(ROOT)),
                                                              "rows": rows, "machine": machine(device),
                                                              "table": md})
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
