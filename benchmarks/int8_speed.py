"""Is int8 faster than fp32 in ONNX Runtime on this CPU, with signed (S8S8) or unsigned (U8S8) activations?
(issue 23: the ORT table found S8S8 slower than fp32 here; `quantize_int8(activations="auto")` may now pick U8S8.)

    python benchmarks/int8_speed.py       # on an otherwise idle machine: it is a timing

The trained ResNet-20 (`weights/resnet20_cifar10.pt`), `make demo`'s slim one (`--slim RUN_DIR`, optional) and
the dense zoo nets of the speed table (random weights: timing only) are exported in fp32 with a dynamic batch and
quantized twice (QDQ, per-channel weights, MinMax on 4 × 16 random inputs, reduce_range as `quantize_int8`
decides): activations int8 and uint8. The three sessions of a model are timed interleaved at batch 1 and 64
(`slimrarts.timing.time_calls`, medians of round medians, spread = (max − min) / median). JSON
`benchmarks/results/int8_speed.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
X = (3, 32, 32)
ZOO = ["preresnet56", "resnet56", "mobilenetv2_cifar"]


def _models(slim: str | None) -> list[tuple[str, torch.nn.Module]]:
    from slimrarts.commands.width import load_weights
    from slimrarts.models import create_model

    dense = create_model("resnet20", num_classes=10)
    load_weights(dense, ROOT / "weights" / "resnet20_cifar10.pt")
    out = [("resnet20 (trained)", dense)]
    if slim:
        import slimrarts

        out.append((f"resnet20 slim ({Path(slim).name})", slimrarts.load(slim)))
    for name in ZOO:
        torch.manual_seed(0)
        out.append((f"{name} (random weights)", create_model(name, num_classes=10)))
    return [(label, m.eval()) for label, m in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slim", help="a run folder (or slim.pt) of a slim ResNet-20, e.g. make demo's")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from slimrarts.deploy import OnnxSession, ort_session, quantize_int8
    from slimrarts.timing import device_timer, time_calls

    torch.set_num_threads(2)
    calibration = [torch.randn(16, *X, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    rows = []
    for label, model in _models(args.slim):
        fp32 = OnnxSession(model, X)
        sessions, records = {"fp32": fp32.session}, {}
        for act in ("int8", "uint8"):
            data, records[act] = quantize_int8(fp32.bytes, calibration, activations=act)
            sessions[act] = ort_session(data)
        name = fp32.session.get_inputs()[0].name
        row = {"model": label, "int8": {k: records["int8"][k] for k in ("per_channel", "reduce_range",
                                                                        "calibration_method", "cpu_vnni")},
               "timing": {}}
        for b in args.batches:
            x = np.random.default_rng(0).standard_normal((b, *X), dtype=np.float32)
            fns = [lambda s=s, x=x, name=name: s.run(None, {name: x}) for s in sessions.values()]
            times = time_calls(fns, device_timer("cpu"), rounds=args.rounds, repeats=args.repeats, warmup=3)
            row["timing"][str(b)] = {k: {"median_ms": 1e3 * t.median_s, "spread": t.spread}
                                     for k, t in zip(sessions, times, strict=True)}
            t = row["timing"][str(b)]
            print(f"{label} b{b}: fp32 {t['fp32']['median_ms']:.2f} ms, S8S8 {t['int8']['median_ms']:.2f}, "
                  f"U8S8 {t['uint8']['median_ms']:.2f}", flush=True)
        rows.append(row)
    write_result("int8_speed", {"rows": rows, "machine": machine(torch.device("cpu")),
                                "settings": {"rounds": args.rounds, "repeats": args.repeats, "threads": 2}})


if __name__ == "__main__":
    main()
