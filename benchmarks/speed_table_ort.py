"""The speed table in the runtime that ships: ONNX Runtime (CPU provider) on this CPU, fp32 and int8.

    SLIMRARTS_DATA=../shared/data python benchmarks/speed_table_ort.py   # on an otherwise idle machine
    python benchmarks/speed_table_ort.py --models resnet56 --no-cpu-tier

The sibling of `speed_table.py` (eager PyTorch), with the same four models, scopes and fixed random α (seed 0: this
table is about cost, not accuracy), each cut by (a) a channel ratio of 0.5, (b) a MACs budget of 50%, (c) the same
with `round_to: 8` (ORT's blocked kernels may run 17 channels no faster than 24), and (d) a latency budget of 50% of
the dense model's time measured in ONNX Runtime at batch 1 and at batch 64, as `prune.budget.runtime: onnxruntime`
does it: the per-layer tables (eager PyTorch) scaled to the dense network's ORT time, the smallest reachable
network timed in ORT before anything else (a target below it is refused, as prune() does), then up to 3 cuts
timed as whole exported networks. Then the CPU-tier slim ResNet-20s of rarts and group-norm (their widths from
`benchmarks/results/cpu_tier/*.width_spec.json`; timing does not depend on the weights).

Every network is exported as `slimrarts export --dynamic-batch` does (torch.onnx dynamo exporter, opset 18) and run
in one onnxruntime session (intra-op threads = torch's, all graph optimisations); int8 is onnxruntime's static QDQ
quantization (`slimrarts.deploy.quantize_int8`: per-channel weights, MinMax, reduce_range only without VNNI),
calibrated on 64 random inputs for the random-α nets (timing only). Dense and slim, fp32 and int8, are timed
interleaved (5 rounds of 20 calls; median, and the spread (max − min) / median of the round medians) at batch 1
and 64.

With the CIFAR-10 archive (`--data` or $SLIMRARTS_DATA), the trained dense ResNet-20 (weights/resnet20_cifar10.pt)
and, when given with `--trained-slim`, a trained slim one (a run folder's slim.pt) get their fp32 and int8 test
accuracy in onnxruntime (int8 calibrated on 256 training images). Writes benchmarks/results/speed_ort_cpu.json after
every model; a rerun with the same batches, rounds, repeats and threads keeps the models already there.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402
from speed_table import MODELS, X, _cut, _gated, _scopes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIER = ROOT / "benchmarks" / "results" / "cpu_tier"


def _sessions(model, calibration):
    """(fp32 session, int8 session, fp32 bytes, int8 record) of `model`, exported with a dynamic batch."""
    from slimrarts.deploy import OnnxSession, ort_session, quantize_int8

    fp32 = OnnxSession(model, X)
    data, record = quantize_int8(fp32.bytes, calibration)
    return fp32.session, ort_session(data), fp32.bytes, data, record


def _timed(dense, slim, batches, rounds, repeats, calibration) -> dict:
    """MACs and params of `slim` against `dense`, and their ORT times, fp32 and int8, interleaved, per batch."""
    from slimrarts.metrics import macs_and_params
    from slimrarts.timing import device_timer, time_calls

    macs0, params0 = macs_and_params(dense, (1, *X))
    macs1, params1 = macs_and_params(slim, (1, *X))
    d32, d8, _, _, drec = _sessions(dense, calibration)
    s32, s8, _, _, _ = _sessions(slim, calibration)
    name = d32.get_inputs()[0].name
    out = {"macs": macs1, "macs_fraction": macs1 / macs0, "params": params1, "params_fraction": params1 / params0,
           "macs_factor": macs0 / macs1, "int8": {k: drec[k] for k in ("per_channel", "reduce_range",
                                                                       "calibration_method", "cpu_vnni")},
           "timing": {}}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *X), dtype=np.float32)
        fns = [lambda s=s, x=x: s.run(None, {name: x}) for s in (d32, s32, d8, s8)]
        td, ts, td8, ts8 = time_calls(fns, device_timer("cpu"), rounds=rounds, repeats=repeats, warmup=3)
        speedup = td.median_s / ts.median_s
        out["timing"][str(b)] = {
            "dense_s": td.median_s, "slim_s": ts.median_s, "dense_spread": td.spread, "slim_spread": ts.spread,
            "speedup": speedup, "realised": speedup / out["macs_factor"],
            "dense_int8_s": td8.median_s, "slim_int8_s": ts8.median_s, "dense_int8_spread": td8.spread,
            "slim_int8_spread": ts8.spread, "int8_speedup": td8.median_s / ts8.median_s,
            "slim_int8_vs_dense_fp32": td.median_s / ts8.median_s}
    return out


def _latency_row(name, scope, gates, dense, b, args, limits) -> tuple[dict | None, tuple | None]:
    """A 50% latency budget at batch `b` in ORT, as prune.budget.runtime=onnxruntime selects it: (a refused row,
    None) or (None, (label, keep, extra))."""
    from slimrarts.deploy import runtime_record, time_in
    from slimrarts.width import budget_floor, build_cost_model, build_latency_model, select_budget, tighten
    from slimrarts.width.budget import format_cost

    sessions: dict = {}
    times = functools.partial(time_in, "onnxruntime", sessions=sessions)
    cm = build_cost_model(gates, X)
    torch_lm = build_latency_model(gates, cm, device="cpu", batch_size=b, repeats=args.repeats)
    [dense_t] = times([dense], X, batch_size=b, rounds=args.rounds, repeats=args.repeats)
    lm = torch_lm.scaled(dense_t.median_s, runtime_record("onnxruntime"))
    target = 0.5 * lm.dense_s
    floor, _ = budget_floor(lm, "latency", **limits)
    label = f"latency 50% (ORT) @ batch {b}"
    base = {"model": name, "scope": "+".join(scope), "mode": label, "target_s": target, "floor_s": floor,
            "dense_ort_s": dense_t.median_s, "dense_torch_s": torch_lm.dense_s,
            "scale": lm.table["scaled"]["factor"]}
    if target < floor:
        return {**base, "reachable": False,
                "note": f"target {format_cost(target, 'latency')} below the tables' floor "
                        f"{format_cost(floor, 'latency')}: prune() fails before training, naming it"}, None
    # every group at its minimum (noisy tables can put their floor at or below zero), as prune() does
    lowest = _cut(gates, scope, select_budget([torch.ones_like(a) for a in gates.alphas], lm,
                                              max(floor, 1e-9 * lm.dense_s), "latency", **limits))
    _, low_t = times([dense, lowest], X, batch_size=b, rounds=args.rounds, repeats=args.repeats)
    if low_t.median_s > target * (1 + max(0.05, low_t.spread)):
        return {**base, "reachable": False, "measured_floor_s": low_t.median_s, "measured_floor_spread": low_t.spread,
                "note": f"target {format_cost(target, 'latency')} below the measured ORT floor "
                        f"{format_cost(low_t.median_s, 'latency')} (tables' floor {format_cost(floor, 'latency')}): "
                        "prune() fails before training, naming it"}, None

    def select(t):
        return select_budget(gates.alphas, lm, t, "latency", **limits)

    result = tighten(select, lambda k: _cut(gates, scope, k), dense, target, X, predict=lm, max_rounds=3,
                     times=times, batch_size=b, rounds=args.rounds, repeats=args.repeats)
    return None, (label, result.keep, {**base, "predicted_s": lm(result.keep), "tighten": result.history,
                                       "met": result.met, "batch": b, "measured_floor_s": low_t.median_s})


def _accuracy(args) -> list[dict]:
    """fp32 and int8 test accuracy in ORT of the trained dense ResNet-20 (and a trained slim one, if given)."""
    from slimrarts.commands.width import load_weights
    from slimrarts.data import make_loaders
    from slimrarts.deploy import OnnxSession, onnx_accuracy, quantize_int8
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "width" / "cpu.yaml")
    cfg = recipe.data
    cfg.root, cfg.eval_batch_size, cfg.batch_size, cfg.download = args.data, 500, 64, False
    loaders = make_loaders(cfg, torch.device("cpu"), seed=0)
    calib = []
    for x, _ in loaders.train:
        calib.append(x.float())
        if len(calib) == 4:  # 256 training images
            break
    test = [(x.float(), y) for x, y in loaders.test]
    dense = create_model("resnet20", num_classes=10)
    load_weights(dense, ROOT / recipe.model.weights)
    models = [("ResNet-20 dense (weights/resnet20_cifar10.pt)", dense.eval())]
    if args.trained_slim:
        import slimrarts

        models.append((f"slim ResNet-20 ({args.trained_slim})", slimrarts.load(args.trained_slim).eval()))
    rows = []
    for label, model in models:
        fp32 = OnnxSession(model, X)
        data, record = quantize_int8(fp32.bytes, calib)
        acc32, acc8 = onnx_accuracy(fp32.bytes, test), onnx_accuracy(data, test)
        rows.append({"model": label, "fp32_acc": acc32["acc"], "int8_acc": acc8["acc"], "images": acc8["images"],
                     "int8": record})
        print(f"   {label}: fp32 {100 * acc32['acc']:.2f}% → int8 {100 * acc8['acc']:.2f}%", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-cpu-tier", action="store_true", help="leave out the CPU-tier slim ResNet-20s")
    ap.add_argument("--data", default=os.environ.get("SLIMRARTS_DATA"), help="CIFAR-10 (for the accuracy rows)")
    ap.add_argument("--trained-slim", help="a run folder (or slim.pt) of a trained slim ResNet-20, for accuracy")
    ap.add_argument("--fresh", action="store_true", help="time every model again, even those already finished")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from slimrarts.deploy import runtime_record
    from slimrarts.models import create_model
    from slimrarts.width import build_cost_model, select_budget, select_ratio, ungated_copy
    from slimrarts.width.surgery import apply_spec

    calibration = [torch.randn(16, *X, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    settings = {"batches": args.batches, "rounds": args.rounds, "repeats": args.repeats,
                "threads": torch.get_num_threads()}
    done = _finished(settings) if not args.fresh else {}
    rows: list[dict] = []

    def save() -> None:  # after every model, so an interrupted table resumes where it stopped
        write_result("speed_ort_cpu", {"command": " ".join(sys.argv), "settings": settings, "rows": rows,
                                       "runtime": runtime_record("onnxruntime"),
                                       "machine": machine(torch.device("cpu")), "table": _table(rows, args.batches)})

    for name in args.models:
        if name in done:
            print(f"== {name}: finished in benchmarks/results/speed_ort_cpu.json, kept (--fresh times it again)")
            rows.extend(done[name])
            continue
        scope, cov = _scopes(name)
        print(f"== {name}: scopes {'+'.join(scope)} (coverage {cov})", flush=True)
        gates = _gated(name, scope)
        dense = ungated_copy(gates).eval()
        cm = build_cost_model(gates, X)
        limits = dict(repeat=gates.repeats)
        modes = [("ratio 0.5", select_ratio(gates.alphas, 0.5, repeats=gates.repeats), None),
                 ("MACs 50%", select_budget(gates.alphas, cm, "50%", "macs", **limits), None),
                 ("MACs 50%, round_to 8", select_budget(gates.alphas, cm, "50%", "macs", round_to=8, **limits), None)]
        for b in args.batches:
            refused, mode = _latency_row(name, scope, gates, dense, b, args, limits)
            if refused is not None:
                rows.append(refused)
                print(f"   {refused['mode']}: {refused['note']}", flush=True)
            else:
                modes.append(mode)
        for label, keep, extra in modes:
            slim = _cut(gates, scope, keep)
            row = {"model": name, "scope": "+".join(scope), "mode": label, "reachable": True,
                   **_timed(dense, slim, args.batches, args.rounds, args.repeats, calibration), **(extra or {})}
            if extra is not None:
                t = row["timing"][str(extra["batch"])]
                row["within_target"] = t["slim_s"] <= extra["target_s"] * (1 + max(0.05, t["slim_spread"]))
            rows.append(row)
            print(f"   {label}: MACs {100 * row['macs_fraction']:.1f}%, " + ", ".join(
                f"b{b} ×{t['speedup']:.2f} fp32 ({100 * t['realised']:.0f}% of MACs), ×{t['int8_speedup']:.2f} int8"
                for b, t in row["timing"].items()), flush=True)
        save()
    if not args.no_cpu_tier and "resnet20" in done:
        print("== CPU tier: finished in benchmarks/results/speed_ort_cpu.json, kept")
        rows.extend(done["resnet20"])
    elif not args.no_cpu_tier:
        print("== CPU tier (resnet20, internal)", flush=True)
        dense = create_model("resnet20", num_classes=10).eval()
        for method in ("rarts", "group-norm"):
            spec_path = TIER / f"{method}-s0.width_spec.json"
            spec = json.loads(spec_path.read_text())
            slim = apply_spec(create_model("resnet20", num_classes=10), spec).eval()
            row = {"model": "resnet20", "scope": "internal", "mode": f"CPU tier: {method} (MACs 50%)",
                   "reachable": True, "spec": str(spec_path.relative_to(ROOT)),
                   **_timed(dense, slim, args.batches, args.rounds, args.repeats, calibration)}
            rows.append(row)
            print(f"   {method}: MACs {100 * row['macs_fraction']:.1f}%, " + ", ".join(
                f"b{b} ×{t['speedup']:.2f} fp32, ×{t['int8_speedup']:.2f} int8" for b, t in row["timing"].items()),
                flush=True)
        save()
    accuracy = _accuracy(args) if args.data else []
    md = _table(rows, args.batches)
    write_result("speed_ort_cpu", {"command": " ".join(sys.argv), "settings": settings, "rows": rows,
                                   "accuracy": accuracy, "runtime": runtime_record("onnxruntime"),
                                   "machine": machine(torch.device("cpu")), "table": md,
                                   "accuracy_table": _acc_table(accuracy)})
    print(md)
    print(_acc_table(accuracy))


def _finished(settings: dict) -> dict[str, list[dict]]:
    """The rows per model of an earlier run with the same settings (a model's rows are written once it is done)."""
    path = ROOT / "benchmarks" / "results" / "speed_ort_cpu.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("settings") != settings:
        return {}
    done: dict[str, list[dict]] = {}
    for row in old["rows"]:
        done.setdefault(row["model"], []).append(row)
    return done


def _table(rows: list[dict], batches: list[int]) -> str:
    head = ("| model (scopes) | selection | MACs kept | params kept | "
            + " | ".join(f"batch {b}: fp32 dense → slim ms (spread), speed-up, share of MACs reduction; int8 dense → "
                         "slim ms, speed-up" for b in batches)
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
                         f"×{t['speedup']:.2f}, {100 * t['realised']:.0f}%; {1e3 * t['dense_int8_s']:.2f} → "
                         f"{1e3 * t['slim_int8_s']:.2f}, ×{t['int8_speedup']:.2f}")
        met = "—" if "within_target" not in r else (
            f"{'yes' if r['within_target'] else 'no'} (target {1e3 * r['target_s']:.2f} ms, predicted "
            f"{1e3 * r['predicted_s']:.2f})")
        lines.append(f"| {label} | {r['mode']} | {100 * r['macs_fraction']:.1f}% | {100 * r['params_fraction']:.1f}% | "
                     + " | ".join(cells) + f" | {met} |")
    return "\n".join(lines)


def _acc_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["| model | fp32 test acc % (ORT) | int8 test acc % (ORT) | int8 settings | activations tried: relative "
             "\\|Δ\\| to fp32, top-1 agreement on the calibration images |", "|---|---|---|---|---|"]
    for r in rows:
        q = r["int8"]
        kind = q.get("activation_type", "int8")
        tried = "; ".join(f"{k}: {v['relative_error']:.3f}, {100 * v.get('top1_agreement', float('nan')):.1f}%"
                          for k, v in q.get("activation_choice", {}).items()) or "—"
        lines.append(f"| {r['model']} | {100 * r['fp32_acc']:.2f} | {100 * r['int8_acc']:.2f} | QDQ "
                     f"{'S8S8' if kind == 'int8' else 'U8S8'}, per-channel {q['per_channel']}, reduce_range "
                     f"{q['reduce_range']}, {q['calibration_method']}, {q['calibration_images']} training images | "
                     f"{tried} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
