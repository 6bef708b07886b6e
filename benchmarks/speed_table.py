"""What a channel ratio, a MACs budget and a latency budget give in measured speed, on this CPU.

    python benchmarks/speed_table.py                       # on an otherwise idle machine: it times networks
    python benchmarks/speed_table.py --models resnet56 --batches 1

For each model, with the scopes that reach furthest on it (the largest `coverage()` among internal, internal +
coupled and internal + branch-input; the table says which), channels are scored by a fixed random α (seed 0: this
table is about cost, not accuracy) and cut by (a) a channel ratio of 0.5, (b) a MACs budget of 50%, and (c) a CPU
latency budget of 50% of the dense model's measured time, at batch 1 and at batch 64 (the selection is tightened up
to 3 times if the measured time misses). Each slim network is timed against the dense one, interleaved (5 rounds of
20 forward passes; median, and the run-to-run spread (max − min) / median of the round medians), at batch 1 and 64,
fp32, `torch.get_num_threads()` threads. Where a latency target is below what the scopes can reach — by the
per-layer model's floor, or by the measured time of the smallest reachable network (prune()'s two pre-flight checks)
— the table gives that floor (the error a user would see) instead of a cut. Writes benchmarks/results/speed_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["preresnet56", "resnet56", "mobilenetv2_cifar", "timm:resnet18"]
SCOPES = [("internal",), ("internal", "coupled"), ("internal", "branch-input")]
X = (3, 32, 32)


def _model(name: str):
    from slimrarts.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    with torch.no_grad():  # realistic BN statistics, so the cut networks compute what trained ones would
        model.train()
        for _ in range(2):
            model(torch.randn(16, *X))
    return model.eval()


def _scopes(name: str) -> tuple[tuple[str, ...], dict]:
    from slimrarts.width import coverage

    best, info = None, {}
    for scope in SCOPES:
        try:
            c = coverage(_model(name), torch.randn(2, *X), scope, check=False)
        except ValueError:
            continue
        info["+".join(scope)] = c["macs_reduction"]
        if best is None or c["macs_reduction"] > info["+".join(best)] + 1e-9:
            best = scope
    return best, info


def _gated(name: str, scope):
    from slimrarts.width import attach_gates

    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gates = attach_gates(model, torch.randn(2, *X), scope)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) + 0.5)
    return gates


def _cut(gates, scope, keep):
    from slimrarts.width import attach_gates, remove_channels, ungated_copy

    slim = ungated_copy(gates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        remove_channels(attach_gates(slim, torch.randn(2, *X), scope, warn=False), keep)
    return slim.eval()


def _timed(dense, slim, batches, rounds, repeats) -> dict:
    from slimrarts.metrics import macs_and_params
    from slimrarts.width import time_models

    macs0, params0 = macs_and_params(dense, (1, *X))
    macs1, params1 = macs_and_params(slim, (1, *X))
    out = {"macs": macs1, "macs_fraction": macs1 / macs0, "params": params1, "params_fraction": params1 / params0,
           "macs_factor": macs0 / macs1, "timing": {}}
    for b in batches:
        td, ts = time_models([dense, slim], X, batch_size=b, device="cpu", rounds=rounds, repeats=repeats)
        speedup = td.median_s / ts.median_s
        out["timing"][str(b)] = {"dense_s": td.median_s, "slim_s": ts.median_s, "dense_spread": td.spread,
                                 "slim_spread": ts.spread, "speedup": speedup, "realised": speedup / out["macs_factor"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    from slimrarts.width import (
        budget_floor,
        build_cost_model,
        build_latency_model,
        select_budget,
        select_ratio,
        tighten,
        ungated_copy,
    )
    from slimrarts.width.budget import format_cost
    from slimrarts.width.latency import time_models

    rows = []
    for name in args.models:
        scope, cov = _scopes(name)
        print(f"== {name}: scopes {'+'.join(scope)} (coverage {cov})", flush=True)
        gates = _gated(name, scope)
        dense = ungated_copy(gates).eval()
        cm = build_cost_model(gates, X)
        limits = dict(repeat=gates.repeats)
        modes = [("ratio 0.5", select_ratio(gates.alphas, 0.5, repeats=gates.repeats), None),
                 ("MACs 50%", select_budget(gates.alphas, cm, "50%", "macs", **limits), None)]
        for b in args.batches:
            lm = build_latency_model(gates, cm, device="cpu", batch_size=b, repeats=args.repeats)
            target = 0.5 * lm.dense_s
            floor, _ = budget_floor(lm, "latency", **limits)
            label = f"latency 50% @ batch {b}"
            if target < floor:
                rows.append({"model": name, "scope": "+".join(scope), "mode": label, "reachable": False,
                             "target_s": target, "floor_s": floor, "dense_predicted_s": lm.dense_s,
                             "note": f"target {format_cost(target, 'latency')} below the reachable floor "
                                     f"{format_cost(floor, 'latency')}: prune() fails before training, naming it"})
                print(f"   {label}: unreachable (floor {1e3 * floor:.3f} ms > target {1e3 * target:.3f} ms)",
                      flush=True)
                continue
            # prune()'s second pre-flight check: the smallest reachable network, timed (Selection.prepare)
            lowest = _cut(gates, scope, select_budget([torch.ones_like(a) for a in gates.alphas], lm, floor,
                                                      "latency", **limits))
            _, low_t = time_models([dense, lowest], X, batch_size=b, device="cpu", rounds=args.rounds,
                                   repeats=args.repeats)
            if low_t.median_s > target * (1 + max(0.05, low_t.spread)):
                rows.append({"model": name, "scope": "+".join(scope), "mode": label, "reachable": False,
                             "target_s": target, "floor_s": floor, "measured_floor_s": low_t.median_s,
                             "measured_floor_spread": low_t.spread, "dense_predicted_s": lm.dense_s,
                             "note": f"target {format_cost(target, 'latency')} below the measured floor "
                                     f"{format_cost(low_t.median_s, 'latency')} (model floor "
                                     f"{format_cost(floor, 'latency')}): prune() fails before training, naming it"})
                print(f"   {label}: unreachable (measured floor {1e3 * low_t.median_s:.3f} ms > target "
                      f"{1e3 * target:.3f} ms)", flush=True)
                continue

            def select(t, lm=lm, gates=gates, limits=limits):
                return select_budget(gates.alphas, lm, t, "latency", **limits)

            def cut(k, gates=gates, scope=scope):
                return _cut(gates, scope, k)

            result = tighten(select, cut, dense, target, X, predict=lm, max_rounds=3,
                             batch_size=b, device="cpu", rounds=args.rounds, repeats=args.repeats)
            modes.append((label, result.keep, {"target_s": target, "predicted_s": lm(result.keep),
                                               "tighten": result.history, "met": result.met, "batch": b}))
        for label, keep, extra in modes:
            slim = _cut(gates, scope, keep)
            row = {"model": name, "scope": "+".join(scope), "mode": label, "reachable": True,
                   **_timed(dense, slim, args.batches, args.rounds, args.repeats), **(extra or {})}
            if extra is not None:
                t = row["timing"][str(extra["batch"])]
                tol = max(0.05, t["slim_spread"])
                row["within_target"] = t["slim_s"] <= extra["target_s"] * (1 + tol)
            rows.append(row)
            print(f"   {label}: MACs {100 * row['macs_fraction']:.1f}%, " + ", ".join(
                f"b{b} ×{t['speedup']:.2f} ({100 * t['realised']:.0f}% of MACs)" for b, t in row["timing"].items()),
                flush=True)
    md = _table(rows, args.batches)
    write_result("speed_cpu", {"command": " ".join(sys.argv), "rows": rows, "machine": machine(torch.device("cpu")),
                               "table": md})
    print(md)


def _table(rows: list[dict], batches: list[int]) -> str:
    head = ("| model (scopes) | selection | MACs kept | params kept | "
            + " | ".join(f"batch {b}: dense → slim ms (spread), speed-up, share of MACs reduction" for b in batches)
            + " | latency target met |")
    lines = [head, "|" + "---|" * (5 + len(batches))]
    for r in rows:
        label = f"{r['model']} ({r['scope']})"
        if not r["reachable"]:
            lines.append(f"| {label} | {r['mode']} | — | — | " + " | ".join("—" for _ in batches)
                         + f" | {r['note']} |")
            continue
        cells = []
        for b in batches:
            t = r["timing"][str(b)]
            cells.append(f"{1e3 * t['dense_s']:.2f} → {1e3 * t['slim_s']:.2f} ({100 * t['slim_spread']:.0f}%), "
                         f"×{t['speedup']:.2f}, {100 * t['realised']:.0f}%")
        met = "—" if "within_target" not in r else (
            f"{'yes' if r['within_target'] else 'no'} (target {1e3 * r['target_s']:.2f} ms, predicted "
            f"{1e3 * r['predicted_s']:.2f})")
        lines.append(f"| {label} | {r['mode']} | {100 * r['macs_fraction']:.1f}% | {100 * r['params_fraction']:.1f}% | "
                     + " | ".join(cells) + f" | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
