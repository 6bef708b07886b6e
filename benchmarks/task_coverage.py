"""How much of torchvision's segmentation and detection models width search reaches (issue 24).

    python benchmarks/task_coverage.py [--models fcn_resnet50 ...] [--scopes internal coupled]

The six models of `tests/test_task_models.py` (random weights, 11 classes: background + CIFAR's 10, as the synthetic
benchmark set), each with its backbone's BatchNorm2d frozen into FrozenBatchNorm2d (what torchvision builds when it
loads pretrained weights) after a few train-mode passes gave them realistic statistics. Per model: the gated
groups and channels, the skipped groups by reason, the gated norm sites that are frozen, the share of the conv and
linear MACs in layers touching a skipped group, and the coverage figure of `benchmarks/zoo_coverage.py` — the MACs
reduction when every gated group is cut to one channel, counted on a real cut — with that cut's removal check:
max |Δ| between the masked gated model and the slim one, on the detectors' raw heads (`raw_output_modules`, as
prune() checks them; boxes after NMS are not comparable), on the output dict for segmentation. Writes
results/task_coverage_cpu.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

# (name, input side, constructor arguments): tests/test_task_models.py's TASK_MODELS
MODELS = [
    ("lraspp_mobilenet_v3_large", 224, {}),
    ("deeplabv3_mobilenet_v3_large", 224, {"aux_loss": True}),
    ("fcn_resnet50", 224, {"aux_loss": True}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 320, {}),
    ("retinanet_resnet50_fpn", 320, {"min_size": 320, "max_size": 320}),
    ("ssdlite320_mobilenet_v3_large", 320, {}),
]


def _model(name: str, size: int, kwargs: dict) -> nn.Module:
    import torchvision

    from slimrarts.width import freeze_batchnorm

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=11, **kwargs)
    with torch.no_grad():  # realistic statistics and affine values in the backbone's norms, then frozen
        for m in model.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.backbone.train()
        for _ in range(2):
            model.backbone(torch.randn(4, 3, size, size))
    freeze_batchnorm(model.backbone)
    return model.eval()


def measure(name: str, size: int, kwargs: dict, scope: list[str]) -> dict:
    from torchvision.ops import FrozenBatchNorm2d

    from slimrarts.width import attach_gates, coverage, raw_output_modules
    from slimrarts.width.skipped import reason_kind

    model = _model(name, size, kwargs)
    x = torch.rand(1, 3, size, size)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = copy.deepcopy(model)
        gates = attach_gates(work, x, scope, warn=False)
        frozen = sum(isinstance(work.get_submodule(s.module), FrozenBatchNorm2d)
                     for g in gates.groups for s in g.sites)
        norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        reasons = collections.Counter(reason_kind(s.reason) for s in gates.skipped)
        heads = raw_output_modules(model)
        row = coverage(model, x, scope, check_modules=heads or None)
    return {"model": name, "task": "detection" if heads else "segmentation", "input": [1, 3, size, size],
            "scope": "+".join(scope), **row, "frozen_norm_sites": frozen, "frozen_norms": norms,
            "skipped_by_reason": dict(reasons), "checked_on": heads or ["output"],
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS])
    ap.add_argument("--scopes", nargs="+", default=["internal", "coupled"])
    args = ap.parse_args()
    rows = []
    for name, size, kwargs in MODELS:
        if name in args.models:
            rows.append(measure(name, size, kwargs, args.scopes))
            r = rows[-1]
            print(f"{name}: gated {r['gated_channels']} in {r['groups']} groups, skipped {r['skipped_groups']} "
                  f"{r['skipped_by_reason']}, frozen sites {r['frozen_norm_sites']}, coverage "
                  f"{r['macs_reduction']:.1%}, max|Δ| {r['max_abs_diff']:.1e}, {r['seconds']} s", flush=True)
    payload = {"machine": machine(torch.device("cpu")), "command": " ".join(["python benchmarks/task_coverage.py",
                                                                              *sys.argv[1:]]),
               "rows": rows, "table": _table(rows)}
    path = write_result("task_coverage_cpu", payload)
    print(f"\n{payload['table']}\nwrote {path}")


def _table(rows: list[dict]) -> str:
    lines = ["| model | task, input | gated channels (groups) | frozen-norm sites gated (of frozen norms) | skipped "
             "groups (channels): reasons | MACs share of layers touching skipped | coverage: MACs reduction at "
             "min width | removal check max \\|Δ\\| (on) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reasons = "; ".join(f"{k} ×{v}" for k, v in sorted(r["skipped_by_reason"].items())) or "—"
        lines.append(
            f"| {r['model']} | {r['task']}, {r['input'][2]} px | {r['gated_channels']} ({r['groups']}) | "
            f"{r['frozen_norm_sites']} ({r['frozen_norms']}) | {r['skipped_groups']} ({r['skipped_channels']}): "
            f"{reasons} | {r['skipped_macs_share']:.0%} | {r['macs_reduction']:.1%} | "
            f"{r['max_abs_diff']:.0e} (of {r['max_abs_ref']:.0e}; {', '.join(r['checked_on'])}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
