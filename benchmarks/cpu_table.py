"""The CPU-tier table: prune the trained ResNet-20 on the full CIFAR-10 to at most 50% of its MACs with RARTS, Network
Slimming, Torch-Pruning's criteria and random channels; same budget of training images for every method.

    SLIMRARTS_DATA=../shared/data nohup python benchmarks/cpu_table.py > runs/cpu_table.log 2>&1 &
    python benchmarks/cpu_table.py --report            # the table from the finished runs, no training
    python benchmarks/cpu_table.py --latency           # time the slim models (on an otherwise idle machine)

RARTS runs with the recipe's settings, fixed before any run (the paper's λ = 1 and β = 1e-3; the α optimizer of
the other tiers). The ablation row "rarts, swept settings" uses the λ, β, α learning rate and search length that
`benchmarks/sensitivity.py --tier cpu` chose on held-out training images (its JSON's `chosen`) and runs only once
that sweep has finished. Every run is `slimrarts run recipes/width/cpu.yaml` with the method's overrides, in
runs/cpu/<row>-s<seed>; a finished run is reused and an interrupted one resumed, so the table can be finished over
several sittings.
Training images per method: rarts and slimming spend 1 epoch searching (D_t + D_v = the training set once) and
fine-tune 3; the one-shot criteria (l1, taylor, fpgm, group-norm) fine-tune 4; random trains 1 epoch, then keeps
random channels at the per-group widths of the rarts run of the same seed, and fine-tunes 3. The best baseline is
declared before any run (group-norm, DepGraph: the best criterion of Torch-Pruning's own benchmark), so the test
set chooses nothing. Differences are judged per test image: McNemar's test on each method against rarts (seed 0),
and the standard error of the accuracy difference from the discordant pairs. Results: benchmarks/results/
cpu_tier.json (rewritten after every run) and the Markdown table it holds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_prune, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "width" / "cpu.yaml"
ONE_SHOT = ("l1", "taylor", "fpgm", "group-norm")
BEST_BASELINE = "group-norm"  # declared in advance (Torch-Pruning's benchmark), not chosen on our test set

# row name -> (method, overrides, seeds); the main table first, then the ablations
MAIN = [
    ("rarts", "rarts", [], [0, 1, 2]),
    ("slimming", "slimming", [], [0, 1]),
    ("group-norm", "group-norm", ["finetune.epochs=4"], [0, 1, 2]),
    ("l1", "l1", ["finetune.epochs=4"], [0]),
    ("taylor", "taylor", ["finetune.epochs=4"], [0]),
    ("fpgm", "fpgm", ["finetune.epochs=4"], [0]),
    ("random", "random", [], [0]),
]
ABLATIONS = [
    ("rarts + shrink losers", "rarts", ["search.shrink.which=losers", "search.shrink.strength=1.0"], [0]),
    ("rarts, final weights mean of w and y", "rarts", ["search.final_weights=mean"], [0]),
    ("rarts, swept settings", "rarts", ["<sweep>"], [0]),
    ("rarts + cost term", "rarts", ["search.cost.mu=0.5"], [0]),
    ("rarts + distillation", "rarts", ["finetune.distill={weight: 0.5, temperature: 4.0}"], [0]),
    ("group-norm + distillation", "group-norm",
     ["finetune.epochs=4", "finetune.distill={weight: 0.5, temperature: 4.0}"], [0]),
]


def _chosen() -> list[str] | None:
    """RARTS' λ, β, α learning rate and search length as chosen on held-out training images by
    `benchmarks/sensitivity.py --tier cpu` (its one-knob-at-a-time rule); None until that sweep has finished."""
    import json

    path = ROOT / "benchmarks" / "results" / "sensitivity_cpu.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    return data.get("chosen", []) if data.get("finished", "chosen" in data) else None


SPECS = ROOT / "benchmarks" / "results" / "cpu_tier"  # each finished run's width spec (random reads rarts')


def _to_hex(bits: torch.Tensor) -> str:
    """Per-image correctness as hex (kept in the results JSON, so McNemar needs no run folder)."""
    import numpy as np

    return np.packbits(bits.numpy().astype(np.uint8)).tobytes().hex()


def _from_hex(text: str, n: int = 10000) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool))


def _slug(row: str) -> str:
    return row.replace(" + ", "+").replace(",", "").replace(" ", "-")


def _run_dir(runs: Path, row: str, seed: int) -> Path:
    return runs / f"{_slug(row)}-s{seed}"


def _test_correct(run: Path, device: torch.device) -> torch.Tensor:
    """Per test image: does the run's final slim model classify it correctly (cached in the run folder)."""
    cache = run / "test_correct.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    import slimrarts
    from slimrarts.data import DeviceLoader, load_cifar, stats_for

    _, test = load_cifar("cifar10", None)
    mean, std = stats_for("cifar10")
    model = slimrarts.load(run).to(device).eval()
    out = []
    with torch.inference_mode():
        for x, y in DeviceLoader(test, 1000, train=False, device=device, mean=mean, std=std):
            out.append(model(x).argmax(1) == y)
    correct = torch.cat(out).cpu()
    torch.save(correct, cache)
    return correct


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> dict:
    """McNemar's test (χ² with continuity correction) of two classifiers on the same images, and the standard error
    of their accuracy difference from the discordant pairs."""
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    d = only_a + only_b
    chi2 = (abs(only_a - only_b) - 1) ** 2 / d if d else 0.0
    p = math.erfc(math.sqrt(chi2 / 2)) if d else 1.0
    diff = (only_a - only_b) / n
    se = math.sqrt(max(d - (only_a - only_b) ** 2 / n, 0.0)) / n
    return {"only_first": only_a, "only_second": only_b, "chi2": chi2, "p": p, "diff": diff, "se": se}


def _fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "—"
    m = statistics.fmean(values) * scale
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {statistics.stdev(values) * scale:.2f}"


def _row(report: dict, row: str, seed: int, run: Path) -> dict:
    a, t = report["accuracy"], report["time_s"]
    where = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
    return {"row": row, "method": report["method"], "seed": seed, "run": str(where),
            "acc": a["slim_after_finetune"], "acc_cut": a["masked"], "acc_dense": a["dense"],
            "acc_searched": a["searched"], "macs": report["macs"]["after"], "macs_dense": report["macs"]["before"],
            "params": report["params"]["after"], "params_dense": report["params"]["before"],
            "prc": report["prc"], "search_s": t["search"], "finetune_s": t["finetune"],
            "search_epochs": report["settings"]["search"]["epochs"] if report["method"] not in ONE_SHOT else 0,
            "finetune_epochs": report["settings"]["finetune"]["epochs"],
            "budget_met": (report.get("budget") or {}).get("met")}


def table(rows: list[dict], tests: dict, latency: dict) -> str:
    names = list(dict.fromkeys(r["row"] for r in rows))
    head = ("| method | seeds | test acc % after fine-tune (final epoch) | right after the cut % | MACs | params | "
            "epochs search + fine-tune | search s | fine-tune s | Δ vs rarts (seed 0) ± SE, McNemar p |")
    lines = [head, "|" + "---|" * 10]
    for name in names:
        rs = [r for r in rows if r["row"] == name]
        first = rs[0]
        t = tests.get(name)
        vs = "—" if t is None else f"{100 * t['diff']:+.2f} ± {100 * t['se']:.2f}, p={t['p']:.3f}"
        lines.append(
            f"| {name} | {len(rs)} | {_fmt([r['acc'] for r in rs])} | {_fmt([r['acc_cut'] for r in rs])} | "
            f"{first['macs'] / 1e6:.2f}M ({100 * first['macs'] / first['macs_dense']:.1f}%) | "
            f"{first['params'] / 1e3:.1f}K | {first['search_epochs']} + {first['finetune_epochs']} | "
            f"{statistics.fmean(r['search_s'] for r in rs):.0f} | {statistics.fmean(r['finetune_s'] for r in rs):.0f} "
            f"| {vs} |")
    if latency:
        lines += ["", "| method (seed 0) | latency batch 1 ms (dense → slim) | speed-up | latency batch 128 ms | "
                  "speed-up |", "|---|---|---|---|---|"]
        for name, lat in latency.items():
            b1, b128 = lat["1"], lat["128"]
            lines.append(f"| {name} | {1e3 * b1['dense_s']:.2f} → {1e3 * b1['slim_s']:.2f} (spread "
                         f"{100 * b1['slim_spread']:.0f}%) | ×{b1['speedup']:.2f} | {1e3 * b128['dense_s']:.1f} → "
                         f"{1e3 * b128['slim_s']:.1f} (spread {100 * b128['slim_spread']:.0f}%) | "
                         f"×{b128['speedup']:.2f} |")
    return "\n".join(lines)


def _time_runs(runs: Path, rows: list[dict]) -> dict:
    """Dense vs slim latency of each row's seed-0 architecture (rebuilt from its width spec: latency does not depend
    on the weights), batch 1 and 128, interleaved, on the CPU (on an otherwise idle machine)."""
    import json

    from slimrarts.models import create_model
    from slimrarts.width import apply_spec, time_models

    dense = create_model("resnet20", num_classes=10).eval()
    out = {}
    for row in dict.fromkeys(r["row"] for r in rows):
        spec = SPECS / f"{_slug(row)}-s0.width_spec.json"
        if not spec.is_file():
            continue
        slim = apply_spec(create_model("resnet20", num_classes=10), json.loads(spec.read_text())).eval()
        out[row] = {}
        for batch in (1, 128):
            td, ts = time_models([dense, slim], (3, 32, 32), batch_size=batch, device="cpu", rounds=5, repeats=20)
            out[row][str(batch)] = {"dense_s": td.median_s, "slim_s": ts.median_s, "dense_spread": td.spread,
                                    "slim_spread": ts.spread, "speedup": td.median_s / ts.median_s}
        print(f"{row}: ×{out[row]['1']['speedup']:.2f} at batch 1, ×{out[row]['128']['speedup']:.2f} at 128",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "cpu"), help="where the run folders go")
    ap.add_argument("--only", nargs="*", help="run only these rows")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--report", action="store_true", help="build the table from finished runs; train nothing")
    ap.add_argument("--latency", action="store_true", help="time the finished runs' slim models (idle machine!)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()

    from slimrarts.recipe import load_recipe

    runs = Path(args.runs)
    chosen = _chosen()
    plan = MAIN + ([] if args.no_ablations else ABLATIONS)
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    previous = {}
    result_file = ROOT / "benchmarks" / "results" / "cpu_tier.json"
    if result_file.is_file():
        import json

        previous = json.loads(result_file.read_text())
    done = {(r["row"], r["seed"]): r for r in previous.get("rows", [])}
    rows = []
    # seed-major: every row's first seed before any second seed, so an unfinished sitting still covers every method
    jobs = sorted(((seed, i, row, method, over) for i, (row, method, over, seeds) in enumerate(plan) for seed in seeds),
                  key=lambda j: (j[0], j[1]))
    for seed, _, row, method, over in jobs:
        run = _run_dir(runs, row, seed)
        if not (run / "report.json").is_file() and (row, seed) in done and "correct_hex" in done[(row, seed)]:
            rows.append(done[(row, seed)])  # finished in an earlier sitting (its run folder may be gone)
            print(f"== {row} seed {seed}: from {result_file.name}", flush=True)
            continue
        if (args.report or args.latency) and not (run / "report.json").is_file():
            continue
        if "<sweep>" in over:
            if not chosen:
                why = "has not finished" if chosen is None else "kept the recipe's settings (the rarts row is this row)"
                print(f"skip {row} s{seed}: benchmarks/sensitivity.py --tier cpu {why}", flush=True)
                continue
            over = [*chosen, *(o for o in over if o != "<sweep>")]
        over_all = [f"search.method={method}", f"seed={seed}", *over, *args.overrides]
        if method == "random":
            ref = _run_dir(runs, "rarts", seed) / "width_spec.json"
            ref = ref if ref.is_file() else SPECS / f"rarts-s{seed}.width_spec.json"
            if not ref.is_file():
                print(f"skip {row} s{seed}: needs the rarts run of seed {seed} first", flush=True)
                continue
            over_all.append(f"prune.reference={ref}")
        recipe = load_recipe(RECIPE, over_all)
        print(f"== {row} seed {seed}: {run}", flush=True)
        report = run_prune(recipe, run, progress=False)
        r = _row(report, row, seed, run)
        r["correct_hex"] = _to_hex(_test_correct(run, torch.device("cpu")))
        SPECS.mkdir(parents=True, exist_ok=True)
        (SPECS / f"{_slug(row)}-s{seed}.width_spec.json").write_text((run / "width_spec.json").read_text())
        rows.append(r)
        print(f"   acc {r['acc']:.4f} (right after the cut {r['acc_cut']:.4f}), MACs {r['macs'] / 1e6:.2f}M",
              flush=True)
        _write(rows, args, previous)
    _write(rows, args, previous, latency=_time_runs(runs, rows) if args.latency else None)


def _write(rows: list[dict], args, previous: dict, latency: dict | None = None) -> None:
    done = {(r["row"], r["seed"]) for r in rows}
    rows = rows + [r for r in previous.get("rows", []) if (r["row"], r["seed"]) not in done]  # rows of other plans
    order = {name: i for i, (name, *_) in enumerate(MAIN + ABLATIONS)}
    rows.sort(key=lambda r: (order.get(r["row"], len(order)), r["seed"]))
    tests = {}
    ref = next((r for r in rows if r["row"] == "rarts" and r["seed"] == 0), None)
    if ref is not None:
        a = _from_hex(ref["correct_hex"])
        for name in dict.fromkeys(r["row"] for r in rows):
            if name == "rarts":
                continue
            other = next((r for r in rows if r["row"] == name and r["seed"] == 0), None)
            if other is not None:
                tests[name] = mcnemar(_from_hex(other["correct_hex"]), a)
    latency = latency if latency is not None else previous.get("latency", {})
    md = table(rows, tests, latency)
    write_result("cpu_tier", {"command": " ".join(sys.argv), "recipe": str(RECIPE.relative_to(ROOT)),
                              "rarts_settings_from_sweep": _chosen(), "best_baseline": BEST_BASELINE, "rows": rows,
                              "mcnemar_vs_rarts_seed0": tests,
                              "latency": latency, "machine": machine(torch.device("cpu")), "table": md})
    print(md, flush=True)


if __name__ == "__main__":
    main()
