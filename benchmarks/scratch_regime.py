"""The paper's regime at CPU scale, from scratch (issue 20, item 5c; exploratory, 1 seed).

    SLIMRARTS_DATA=../shared/data nohup python benchmarks/scratch_regime.py > runs/scratch_regime.log 2>&1 &
    python benchmarks/scratch_regime.py --report

ResNet-20 from random weights on the full CIFAR-10 (50,000 / 10,000), cut to ≤ 50% of the MACs (scope internal, BN
recalibration on), every method with 2N epochs of training images, N = 10:
- rarts (the configuration `benchmarks/heldout_choice.py` chose): N search epochs, then N fine-tune epochs;
- Network Slimming: N epochs of sparsity training (s = 1e-4, γ initialised to 0.5), then N fine-tune epochs;
- group-norm on a dense net trained N epochs (`slimrarts train`), then N fine-tune epochs.
The N epochs before the cut share one schedule (SGD lr 0.1, momentum 0.9, cosine, weight decay 5e-4, after the
chosen configuration's own overrides); fine-tuning is `recipes/width/cpu.yaml`'s (lr 0.02, cosine). Run folders in
runs/scratch/<row>; finished runs are reused, interrupted ones resumed. Results:
benchmarks/results/scratch_regime.json. About 4 hours of a 2-core CPU in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_prune, write_result  # noqa: E402
from cpu_table import _from_hex, _test_correct, _to_hex, mcnemar  # noqa: E402
from rarts_regimes import chosen_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "width" / "cpu.yaml"
OUT = ROOT / "benchmarks" / "results" / "scratch_regime.json"
N = 10
SCHEDULE = ["optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=0.0005",
            "optim.schedule=cosine"]


def _baseline_key() -> str:
    """Where the recipe keeps slimming's settings: `baselines` (from issue 21 on) or `search` (before)."""
    from slimrarts.recipe import Recipe

    return "baselines" if "baselines" in {f.name for f in dataclasses.fields(Recipe)} else "search"


def _dense(runs: Path) -> tuple[Path, dict]:
    """The dense ResNet-20 trained N epochs from scratch (`slimrarts train`), reused once finished."""
    from slimrarts.commands.width import train_recipe
    from slimrarts.recipe import load_recipe

    folder = runs / f"dense-{N}-epochs"
    if (folder / "model.pt").is_file() and (folder / "report.json").is_file():
        return folder / "model.pt", json.loads((folder / "report.json").read_text())
    recipe = load_recipe(RECIPE, ["model.weights=null", f"train.epochs={N}", "train.channels_last=true",
                                  *(f"train.{o}" for o in SCHEDULE)])
    report = train_recipe(recipe, folder, resume=(folder / "recipe.yaml").is_file(), progress=False)
    return folder / "model.pt", report


def _plan(chosen: list[str] | None, dense_weights: Path | None) -> dict[str, list[str] | None]:
    key = _baseline_key()
    before = [f"search.{o}" for o in SCHEDULE]
    return {
        "rarts (chosen)": None if chosen is None else [
            "model.weights=null", *chosen, f"search.epochs={N}", *before, f"finetune.epochs={N}"],
        "network slimming": ["model.weights=null", "search.method=slimming", f"search.epochs={N}", *before,
                             f"{key}.sparsity=0.0001", f"{key}.init_gamma=0.5", f"finetune.epochs={N}"],
        "group-norm on the dense net": None if dense_weights is None else [
            f"model.weights={dense_weights}", "search.method=group-norm", f"finetune.epochs={N}"],
    }


def _table(rows: dict, dense: dict | None) -> str:
    lines = [f"| method (N = {N}) | epochs of images | MACs kept | cut → recal % | final top-1 % | Δ vs group-norm "
             "(McNemar p) | wall h |", "|---|---|---|---|---|---|---|"]
    ref = rows.get("group-norm on the dense net")
    for name, r in rows.items():
        delta = ""
        if ref is not None and r is not ref:
            m = mcnemar(_from_hex(r["correct_hex"]), _from_hex(ref["correct_hex"]))
            delta = f"{100 * (r['acc'] - ref['acc']):+.2f} ({m['p']:.2g})"
        lines.append(f"| {name} | {r['epochs']} | {100 * r['macs_fraction']:.1f}% | {100 * r['cut_stale']:.1f} → "
                     f"{100 * r['cut_recal']:.1f} | {100 * r['acc']:.2f} | {delta} | {r['wall_s'] / 3600:.2f} |")
    if dense is not None:
        lines.append(f"\nThe dense net after {N} epochs from scratch: {100 * dense['test_acc']:.2f}% "
                     f"({dense['train_s'] / 3600:.2f} h).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "scratch"))
    ap.add_argument("--report", action="store_true", help="the table from finished runs; train nothing")
    args = ap.parse_args()

    from slimrarts.recipe import load_recipe

    runs = Path(args.runs)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    rows, dense = data.get("rows", {}), data.get("dense")
    chosen = chosen_overrides()
    weights = None
    if not args.report:
        weights, dense = _dense(runs)
    for name, over in _plan(chosen, weights).items():
        if args.report or name in rows:
            continue
        if over is None:
            print(f"skip {name}: waits for the held-out choice", flush=True)
            continue
        folder = runs / "".join(c if c.isalnum() else "-" for c in name).strip("-")
        print(f"== {name}: {folder}", flush=True)
        report = run_prune(load_recipe(RECIPE, over), folder, progress=False)
        a, t, s = report["accuracy"], report["time_s"], report["settings"]
        before = N if name != "group-norm on the dense net" else f"{N} (dense training)"
        rows[name] = {"overrides": over, "acc": a["slim_after_finetune"], "cut_stale": a["slim_stale_bn"],
                      "cut_recal": a["slim_before_finetune"], "macs_fraction": 1 - report["macs"]["reduction"],
                      "epochs": f"{before} + {s['finetune']['epochs']}",
                      "wall_s": t["search"] + t["finetune"] + (dense["train_s"] if before != N else 0.0),
                      "method_note": report["method_note"],
                      "correct_hex": _to_hex(_test_correct(folder, torch.device("cpu")))}
        print(f"   acc {rows[name]['acc']:.4f}", flush=True)
        write_result("scratch_regime", {"command": " ".join(sys.argv), "n": N, "rows": rows, "dense": dense,
                                        "chosen": chosen, "table": _table(rows, dense),
                                        "machine": machine(torch.device("cpu"))})
    print(_table(rows, dense))


if __name__ == "__main__":
    main()
