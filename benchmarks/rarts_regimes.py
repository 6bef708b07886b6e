"""The CPU tier again, with BN recalibration and the RARTS configuration chosen on held-out images; and the regimes
where learned widths should win (issue 20, items 4 and 5).

    SLIMRARTS_DATA=../shared/data nohup python benchmarks/rarts_regimes.py > runs/rarts_regimes.log 2>&1 &
    python benchmarks/rarts_regimes.py --report          # the tables from the finished runs
    python benchmarks/rarts_regimes.py --only main severe

Every row is `slimrarts run recipes/width/cpu.yaml` (trained ResNet-20, full CIFAR-10, scope internal, BN
recalibration on: the default 40 batches) with its overrides, in runs/regimes/<row>-s<seed>; finished runs are
reused (and kept in benchmarks/results/rarts_regimes.json, so a run folder may be deleted), interrupted ones
resumed. "rarts (chosen)" is the configuration `benchmarks/heldout_choice.py` chose (its JSON's `chosen`); its rows
are skipped until every candidate there has run. Tables:

- main: ≤ 50% of the MACs, 3 seeds: rarts (chosen), group-norm (declared the best criterion before any run) and
  Taylor, 4 epochs of training images each (rarts 1 search + 3 fine-tune); "group-norm at RARTS' compute" fine-tunes
  5 epochs (RARTS' search epoch costs ~1.75 plain epochs here, so 1 + 3 ≈ 4.75 epochs of compute);
- severe: ≤ 25% of the MACs, 3 seeds, rarts (chosen) and group-norm;
- curve: 8 and 16 epochs of training images in all (rarts: a quarter searching), 1 seed, exploratory.
Δ is per seed against group-norm of the same seed on the same test images (± the SE of the paired difference,
McNemar's p); the mean Δ has a t-interval over seeds. Results: benchmarks/results/rarts_regimes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_prune, write_result  # noqa: E402
from cpu_table import _from_hex, _test_correct, _to_hex, mcnemar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "width" / "cpu.yaml"
OUT = ROOT / "benchmarks" / "results" / "rarts_regimes.json"
CHOICE = ROOT / "benchmarks" / "results" / "heldout_choice.json"
SEEDS = [0, 1, 2]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student's t, two-sided 95%, by degrees of freedom
GN = ["search.method=group-norm"]

# table -> [(row, overrides, seeds, reference row for Δ)]; "<chosen>" is replaced by heldout_choice's overrides
PLAN = {
    "main": [
        ("group-norm", [*GN, "finetune.epochs=4"], SEEDS, None),
        ("rarts (chosen)", ["<chosen>"], SEEDS, "group-norm"),
        ("taylor", ["search.method=taylor", "finetune.epochs=4"], SEEDS, "group-norm"),
        ("group-norm at RARTS' compute", [*GN, "finetune.epochs=5"], SEEDS, "group-norm"),
    ],
    "severe": [
        ("group-norm, 25%", [*GN, "finetune.epochs=4", "prune.budget.target=25%"], SEEDS, None),
        ("rarts (chosen), 25%", ["<chosen>", "prune.budget.target=25%"], SEEDS, "group-norm, 25%"),
    ],
    "curve": [
        ("group-norm, 8 epochs", [*GN, "finetune.epochs=8"], [0], None),
        ("rarts (chosen), 2 + 6 epochs", ["<chosen>", "search.epochs=2", "finetune.epochs=6"], [0],
         "group-norm, 8 epochs"),
        ("group-norm, 16 epochs", [*GN, "finetune.epochs=16"], [0], None),
        ("rarts (chosen), 4 + 12 epochs", ["<chosen>", "search.epochs=4", "finetune.epochs=12"], [0],
         "group-norm, 16 epochs"),
    ],
}


def chosen_overrides() -> list[str] | None:
    """The overrides of the configuration heldout_choice.py chose; None until every candidate it can choose has run
    (its controls are never chosen, so the main table need not wait for them)."""
    data = json.loads(CHOICE.read_text()) if CHOICE.is_file() else {}
    if not data.get("chosen"):
        return None
    return list(data["candidates"][data["chosen"]]["overrides"])


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row).strip("-").replace("--", "-")


def _summary(rows: dict) -> str:
    out = []
    for table, plan in PLAN.items():
        out += [f"**{table}**", "", "| row | seeds | test acc % (final epoch) | cut → recal % | MACs | epochs | "
                "wall s | Δ per seed vs reference ± SE (McNemar p) | mean Δ, 95% t-interval |",
                "|---|---|---|---|---|---|---|---|---|"]
        for row, _, seeds, ref in plan:
            rs = [rows[f"{row}|{s}"] for s in seeds if f"{row}|{s}" in rows]
            if not rs:
                out.append(f"| {row} | 0 | (not run yet) | | | | | | |")
                continue
            acc = [100 * r["acc"] for r in rs]
            sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
            deltas, cells = [], []
            for r in rs:
                other = rows.get(f"{ref}|{r['seed']}") if ref else None
                if other is None:
                    continue
                t = mcnemar(_from_hex(r["correct_hex"]), _from_hex(other["correct_hex"]))
                deltas.append(100 * t["diff"])
                cells.append(f"s{r['seed']}: {100 * t['diff']:+.2f} ± {100 * t['se']:.2f} (p={t['p']:.3f})")
            interval = ""
            if len(deltas) >= 2:
                m, se = statistics.fmean(deltas), statistics.stdev(deltas) / math.sqrt(len(deltas))
                h = T_975[len(deltas) - 1] * se
                interval = f"{m:+.2f} [{m - h:+.2f}, {m + h:+.2f}]"
            elif deltas:
                interval = f"{deltas[0]:+.2f} (1 seed)"
            r0 = rs[0]
            out.append(f"| {row} | {len(rs)} | {statistics.fmean(acc):.2f}{sd} | "
                       f"{statistics.fmean(100 * r['cut_stale'] for r in rs):.1f} → "
                       f"{statistics.fmean(100 * r['cut_recal'] for r in rs):.1f} | "
                       f"{r0['macs'] / 1e6:.2f}M ({100 * r0['macs_fraction']:.1f}%) | {r0['epochs']} | "
                       f"{statistics.fmean(r['wall_s'] for r in rs):.0f} | {'; '.join(cells)} | {interval} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "regimes"))
    ap.add_argument("--only", nargs="+", choices=list(PLAN), help="these tables only")
    ap.add_argument("--report", action="store_true", help="the tables from finished runs; train nothing")
    args = ap.parse_args()

    from slimrarts.recipe import load_recipe

    rows = json.loads(OUT.read_text())["rows"] if OUT.is_file() else {}
    chosen = chosen_overrides()
    jobs = [(seed, table, row, over) for table, plan in PLAN.items() if not args.only or table in args.only
            for row, over, seeds, _ in plan for seed in seeds]
    jobs.sort(key=lambda j: j[0])  # every row's first seed before any second seed
    for seed, _, row, over in ([] if args.report else jobs):
        key = f"{row}|{seed}"
        if key in rows:
            continue
        if "<chosen>" in over:
            if chosen is None:
                print(f"skip {row} s{seed}: benchmarks/heldout_choice.py has not chosen yet", flush=True)
                continue
            over = [*chosen, *(o for o in over if o != "<chosen>")]
        run = Path(args.runs) / f"{_slug(row)}-s{seed}"
        print(f"== {row} seed {seed}: {run}", flush=True)
        report = run_prune(load_recipe(RECIPE, [f"seed={seed}", *over]), run, progress=False)
        a, t, s = report["accuracy"], report["time_s"], report["settings"]
        searched = s["search"]["epochs"] if report["method"] not in ("group-norm", "taylor", "l1", "fpgm") else 0
        rows[key] = {"row": row, "seed": seed, "overrides": over, "acc": a["slim_after_finetune"],
                     "cut_stale": a["slim_stale_bn"], "cut_recal": a["slim_before_finetune"],
                     "macs": report["macs"]["after"], "macs_fraction": 1 - report["macs"]["reduction"],
                     "epochs": f"{searched} + {s['finetune']['epochs']}", "wall_s": t["search"] + t["finetune"],
                     "method_note": report["method_note"],
                     "correct_hex": _to_hex(_test_correct(run, torch.device("cpu")))}
        print(f"   acc {rows[key]['acc']:.4f}", flush=True)
        write_result("rarts_regimes", {"command": " ".join(sys.argv), "rows": rows, "chosen": chosen,
                                       "table": _summary(rows), "machine": machine(torch.device("cpu"))})
    table = _summary(rows)
    if rows:
        write_result("rarts_regimes", {"command": " ".join(sys.argv), "rows": rows, "chosen": chosen, "table": table,
                                       "machine": machine(torch.device("cpu"))})
    print(table)


if __name__ == "__main__":
    main()
