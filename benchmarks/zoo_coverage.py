"""How much of each zoo CNN width search reaches: gated and skipped channels, and the coverage figure.

    python benchmarks/zoo_coverage.py [--models timm:dpn68 ...] [--scopes internal coupled] [--size 64]

Coverage is the MACs reduction reached when every gated group is cut to `min_channels` (1 channel; for channels of
grouped convs one α entry, i.e. one channel per conv group): a copy of the model is gated, cut for real and counted
with torch-pruning's MACs counter (batch 1, random init, eval mode), so the figure is true by construction. The cut
is also checked against the gated model with the pruned α at 0 (max|Δ|). Writes results/zoo_coverage_<device>.json
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, machine, write_result  # noqa: E402

from slimrarts.models import create_model  # noqa: E402
from slimrarts.width import coverage  # noqa: E402

MODELS = [
    # the slow zoo sweep's models (tests/test_width.py::ZOO)
    "torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf", "torchvision:densenet121", "torchvision:shufflenet_v2_x0_5",
    "torchvision:convnext_tiny", "torchvision:squeezenet1_0", "torchvision:mnasnet0_5", "timm:rexnet_100",
    "timm:repvgg_a0", "timm:convnext_atto", "timm:ese_vovnet19b_dw", "timm:cspresnet50", "timm:dla34", "timm:mixnet_s",
    "timm:tf_efficientnetv2_b0", "timm:resnest14d", "timm:seresnet18", "timm:res2net50_14w_8s", "timm:ghostnet_100",
    "timm:regnety_002",
    # issue 14's families: grouped convs, dual paths, re-parameterisable blocks, global response norm
    "torchvision:resnext50_32x4d", "torchvision:regnet_y_400mf", "timm:seresnext26d_32x4d", "timm:regnetx_002",
    "timm:dpn68", "timm:mobileone_s0", "timm:convnextv2_atto",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--scopes", nargs="+", default=["internal", "coupled"])
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--min-channels", type=int, default=1)
    args = ap.parse_args()
    device = torch.device("cpu")
    rows = []
    for name in args.models:
        for scope in args.scopes:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10).eval()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = coverage(model, torch.randn(2, 3, args.size, args.size), scope, min_channels=args.min_channels)
            row = {"model": name, "scope": scope, **row, "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(_line(row), flush=True)
    payload = {"machine": machine(device), "command": " ".join(["python benchmarks/zoo_coverage.py", *sys.argv[1:]]),
               "input": [1, 3, args.size, args.size], "min_channels": args.min_channels, "rows": rows}
    path = write_result(f"zoo_coverage_{device_tag(device)}", payload)
    print(f"\n{_table(rows)}\nwrote {path}")


def _line(r: dict) -> str:
    return (f"{r['model']:34s} {r['scope']:9s} gated {r['gated_channels']:6d} in {r['groups']:3d} groups "
            f"({r['grouped_groups']} grouped), skipped {r['skipped_groups']:3d} ({r['skipped_channels']} ch), "
            f"coverage {r['macs_reduction']:.1%}, max|d| {r.get('max_abs_diff', 0.0):.1e}  {r['seconds']}s")


def _table(rows: list[dict]) -> str:
    head = ("| model | scope | gated channels (groups, of them grouped-conv) | skipped groups (channels) | "
            "out of scope groups | MACs share of layers touching skipped | coverage: MACs reduction at min width | "
            "max abs diff |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scope']} | {r['gated_channels']} ({r['groups']}, {r['grouped_groups']}) | "
                     f"{r['skipped_groups']} ({r['skipped_channels']}) | {r['out_of_scope_groups']} | "
                     f"{r['skipped_macs_share']:.0%} | {r['macs_reduction']:.1%} | {r.get('max_abs_diff', 0.0):.0e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
