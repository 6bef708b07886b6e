"""Table 6 of the RARTS paper at a chosen tier: MobileNetV2 in ℓ1 mode (learned pruning ratio).

    python benchmarks/l1_table.py --tier mini --methods rarts darts1 darts2 random --seeds 0 1

Each (method, seed) is one `slimrarts.prune` run of recipes/l1/<tier>.yaml with prune.mode=l1, in
runs/l1/<tier>/<method>-s<seed> (reused if finished). `random` prunes random channels at the per-group counts that
the rarts run of the same seed learned (the paper's "random pruning"), so it needs rarts first in --methods.
PRC is reported two ways: over all gated channels, and as the paper's "average pruning ratio over the pruned
layers" (the mean of per-group ratios over groups that lost channels). Writes benchmarks/results/l1_<tier>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_baseline, run_prune, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _layer_prc(run: Path) -> float:
    spec = json.loads((run / "width_spec.json").read_text())
    ratios = [1 - len(g["kept"]) / g["size"] for g in spec["groups"] if len(g["kept"]) < g["size"]]
    return statistics.fmean(ratios) if ratios else 0.0


def _ms(values: list[float]) -> str:
    m = 100 * statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="mini", choices=["mini", "paper"])
    ap.add_argument("--methods", nargs="+", default=["baseline", "rarts", "darts1", "darts2", "random"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "l1"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    from slimrarts.engine import resolve_device
    from slimrarts.recipe import load_recipe

    recipe_path = ROOT / "recipes" / "l1" / f"{args.tier}.yaml"
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            run_dir = Path(args.runs) / args.tier / f"{method}-s{seed}"
            over = [f"seed={seed}", *args.overrides]
            if method == "baseline":
                recipe = load_recipe(recipe_path, over)
                print(f"== baseline seed {seed}", flush=True)
                rep = run_baseline(recipe, run_dir, args.progress)
                rows.append({"method": method, "seed": seed, "acc": rep["test_acc"], "prc": 0.0, "layer_prc": 0.0,
                             "params": rep["params"], "macs": rep["macs"], "search_s": 0.0,
                             "finetune_s": rep["train_s"]})
                continue
            over += [f"search.method={method}"]
            if method == "random":
                ref = Path(args.runs) / args.tier / f"rarts-s{seed}"
                if not (ref / "width_spec.json").is_file():
                    raise SystemExit("random needs the rarts run of the same seed first (put rarts before random)")
                over += [f"prune.reference={ref}", "prune.mode=ratio"]
            recipe = load_recipe(recipe_path, over)
            print(f"== {method} seed {seed}: {run_dir}", flush=True)
            rep = run_prune(recipe, run_dir, args.progress)
            rows.append({"method": method, "seed": seed, "acc": rep["accuracy"]["slim_after_finetune"],
                         "acc_before_finetune": rep["accuracy"]["slim_before_finetune"], "prc": rep["prc"],
                         "layer_prc": _layer_prc(run_dir), "params": rep["params"]["after"],
                         "macs": rep["macs"]["after"], "search_s": rep["time_s"]["search"],
                         "finetune_s": rep["time_s"]["finetune"], "run": str(run_dir)})
            print(f"   test acc {rows[-1]['acc']:.4f}  prc {rows[-1]['prc']:.3f}", flush=True)
    lines = ["| method | test error (%) | PRC, all gated channels (%) | PRC, mean over pruned layers (%) | params | "
             "MACs/image | search s | seeds |", "|---|---|---|---|---|---|---|---|"]
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method]
        lines.append(f"| {method} | {_ms([1 - r['acc'] for r in rs])} | {_ms([r['prc'] for r in rs])} | "
                     f"{_ms([r['layer_prc'] for r in rs])} | {statistics.fmean(r['params'] for r in rs) / 1e6:.3f}M | "
                     f"{statistics.fmean(r['macs'] for r in rs) / 1e6:.1f}M | "
                     f"{statistics.fmean(r['search_s'] for r in rs):.0f} | {len(rs)} |")
    md = "\n".join(lines)
    device = resolve_device(load_recipe(recipe_path).device)
    path = write_result(f"l1_{args.tier}", {"command": " ".join(sys.argv), "recipe": str(recipe_path.relative_to(ROOT)),
                                            "rows": rows, "table": md, "machine": machine(device)})
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
