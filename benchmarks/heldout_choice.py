"""Which RARTS configuration the CPU tier's main table runs: chosen on held-out training images by a rule fixed here.

    SLIMRARTS_DATA=../shared/data nohup python benchmarks/heldout_choice.py > runs/heldout_choice.log 2>&1 &
    python benchmarks/heldout_choice.py --report     # the table and the choice from the finished rows

Every candidate is `recipes/width/cpu.yaml` (trained ResNet-20 → ≤ 50% of the MACs, scope internal, 1 search + 3
fine-tune epochs; the one-shot criteria 0 + 4) run on 45,000 training images (4,500 per class); it is scored on the
5,000 held out (the next 500 per class), which neither the search, the fine-tuning nor the BN recalibration read.
The test set is not read. Seed 0 for every row.

The rule, written down before any run (issue 20, item 3):
1. each candidate has a complexity (the number of changes from the paper's RARTS);
2. the chosen configuration has the highest held-out accuracy after fine-tuning (final epoch), except that a
   candidate whose lead over a simpler candidate is within one standard error of their paired difference (from the
   held-out images only one of the two got right) loses to the simpler one;
3. controls are scored but never chosen: the magnitude start with α frozen (what the search adds), and the
   criteria: group-norm (the best criterion, declared before the CPU tier's runs) and Taylor on the images the
   search reads (one epoch of batches, not 10). Nobody's fine-tuning learning rate is tuned: every row fine-tunes
   with the recipe's (0.02, cosine).
Results: benchmarks/results/heldout_choice.json (rewritten after every row; finished rows are skipped and an
interrupted run resumes from its folder runs/heldout/<row>).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402
from sensitivity import _holdout_loaders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "width" / "cpu.yaml"
OUT = ROOT / "benchmarks" / "results" / "heldout_choice.json"
BASE = ["data.limit_per_class=4500", "seed=0"]
HOLDOUT = 500
STEPS_PER_EPOCH = 352  # 45,000 / 128 rounded up: the batches the search's α-steps read, for Taylor's control

# name -> (complexity, overrides, control); complexity counts the changes from the paper's RARTS
CANDIDATES = {
    "rarts (paper: |α|)": (0, [], False),
    "score |α·γ|": (1, ["search.score=alpha_gamma"], False),
    "score Σ|α ⊙ ∇α|": (1, ["search.score=grad"], False),
    "magnitude start": (1, ["search.init=magnitude"], False),
    "magnitude start + score Σ|α ⊙ ∇α|": (2, ["search.init=magnitude", "search.score=grad"], False),
    "magnitude start + α by SGD": (2, ["search.init=magnitude", "search.optim_arch.optimizer=sgd",
                                       "search.optim_arch.lr=0.1", "search.optim_arch.momentum=0.9"], False),
    "magnitude start + weights lr 0.002": (2, ["search.init=magnitude", "search.optim.lr=0.002"], False),
    "cost term μ=0.5": (1, ["search.cost.mu=0.5"], False),
    "control: magnitude start, α frozen": (1, ["search.init=magnitude", "search.optim_arch.lr=1e-12"], True),
    "control: group-norm": (0, ["search.method=group-norm", "finetune.epochs=4"], True),
    "control: taylor, search's images": (0, ["search.method=taylor", "finetune.epochs=4",
                                             f"baselines.taylor_batches={STEPS_PER_EPOCH}"], True),
}


def _run(name: str, overrides: list[str]) -> dict:
    from slimrarts import prune
    from slimrarts.commands.width import load_weights
    from slimrarts.engine import evaluate, resolve_device
    from slimrarts.engine.step import batches_on
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*BASE, *overrides])
    device = resolve_device(recipe.device)
    loaders = _holdout_loaders(recipe, HOLDOUT, device)
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.name, num_classes=loaders.num_classes, **recipe.model.kwargs)
    load_weights(model, ROOT / recipe.model.weights)
    folder = ROOT / "runs" / "heldout" / "".join(c if c.isalnum() else "-" for c in name).strip("-")
    resume = (folder / "recipe.yaml").is_file()
    result = prune(model, loaders, config=recipe, run_dir=folder, resume=resume, progress=False)
    rep = result.report
    slim = result.model.eval()
    hits = []
    with torch.no_grad():
        for x, y in batches_on(loaders.test, device):
            hits.append((slim(x).argmax(1) == y).to(torch.uint8))
    correct = torch.cat(hits)
    assert abs(float(correct.float().mean()) - evaluate(slim, loaders.test)["acc"]) < 1e-6
    a = rep["accuracy"]
    return {"heldout_acc": a["slim_after_finetune"], "heldout_cut_stale": a["slim_stale_bn"],
            "heldout_cut_recal": a["slim_before_finetune"], "macs": rep["macs"]["after"],
            "macs_fraction": 1 - rep["macs"]["reduction"], "search_s": rep["time_s"]["search"],
            "finetune_s": rep["time_s"]["finetune"], "correct": "".join(map(str, correct.tolist())),
            "overrides": overrides}


def _paired_se(a: str, b: str) -> float:
    """Standard error of the accuracy difference of two rows on the same images (from the discordant pairs)."""
    n = len(a)
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    d = (only_a - only_b) / n
    return math.sqrt(max((only_a + only_b) / n - d * d, 0.0) / n)


def choose(rows: dict) -> tuple[str | None, list[str]]:
    """The rule of the module docstring over the finished candidate rows: (chosen name, the reasoning)."""
    cands = {k: v for k, v in rows.items() if k in CANDIDATES and not CANDIDATES[k][2]}
    if not cands:
        return None, []
    order = sorted(cands, key=lambda k: (-cands[k]["heldout_acc"], CANDIDATES[k][0]))
    best, why = order[0], []
    for other in sorted(cands, key=lambda k: (CANDIDATES[k][0], -cands[k]["heldout_acc"])):
        if CANDIDATES[other][0] >= CANDIDATES[best][0]:
            continue
        lead = cands[best]["heldout_acc"] - cands[other]["heldout_acc"]
        se = _paired_se(cands[best]["correct"], cands[other]["correct"])
        if lead <= se:
            why.append(f"{best} leads {other} by {100 * lead:.2f} ≤ 1 SE ({100 * se:.2f}): the simpler wins")
            best = other
    return best, why


def _table(rows: dict) -> str:
    ref = rows.get("rarts (paper: |α|)")
    lines = ["| candidate | changes | held-out acc % (final epoch) | Δ vs paper ± SE | cut → recal % | MACs | "
             "search s |", "|---|---|---|---|---|---|---|"]
    for name, (complexity, _, control) in CANDIDATES.items():
        r = rows.get(name)
        shown = name.replace("|", "\\|")  # a bar inside a Markdown table cell
        if r is None:
            lines.append(f"| {shown} | {complexity} | (not run yet) | | | | |")
            continue
        delta = ""
        if ref is not None and name != "rarts (paper: |α|)":
            delta = (f"{100 * (r['heldout_acc'] - ref['heldout_acc']):+.2f} ± "
                     f"{100 * _paired_se(r['correct'], ref['correct']):.2f}")
        lines.append(f"| {shown}{' (control)' if control else ''} | {complexity} | {100 * r['heldout_acc']:.2f} | "
                     f"{delta} | {100 * r['heldout_cut_stale']:.1f} → {100 * r['heldout_cut_recal']:.1f} | "
                     f"{r['macs'] / 1e6:.2f}M ({100 * r['macs_fraction']:.1f}%) | {r['search_s']:.0f} |")
    return "\n".join(lines)


def _candidates_done(rows: dict) -> bool:
    """Whether every candidate that can be chosen has run: controls are never chosen, so the choice is final then."""
    return all(name in rows for name, (_, _, control) in CANDIDATES.items() if not control)


def _write(rows: dict, finished: bool) -> None:
    chosen, why = choose(rows) if _candidates_done(rows) else (None, [])
    write_result("heldout_choice", {"command": " ".join(sys.argv), "recipe": str(RECIPE.relative_to(ROOT)),
                                    "base": BASE, "holdout_per_class": HOLDOUT, "rows": rows,
                                    "finished": finished, "chosen": chosen, "why": why, "table": _table(rows),
                                    "candidates": {k: {"complexity": c, "overrides": o, "control": ctl}
                                                   for k, (c, o, ctl) in CANDIDATES.items()},
                                    "machine": machine(torch.device("cpu"))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", help="the table from the finished rows; run nothing")
    ap.add_argument("--only", nargs="+", help="run just these candidates (names as in CANDIDATES)")
    args = ap.parse_args()
    rows = json.loads(OUT.read_text())["rows"] if OUT.is_file() else {}
    if not args.report:
        for name, (_, overrides, _) in CANDIDATES.items():
            if name in rows or (args.only and name not in args.only):
                continue
            print(f"{name}: running", flush=True)
            rows[name] = _run(name, overrides)
            r = rows[name]
            print(f"{name}: held-out {100 * r['heldout_acc']:.2f}% (cut {100 * r['heldout_cut_stale']:.1f} → "
                  f"recal {100 * r['heldout_cut_recal']:.1f})", flush=True)
            _write(rows, finished=False)
    finished = all(name in rows for name in CANDIDATES)
    if rows:
        _write(rows, finished)
    print(_table(rows))
    if _candidates_done(rows):
        chosen, why = choose(rows)
        print(f"chosen: {chosen}", *why, sep="\n")


if __name__ == "__main__":
    main()
