"""Issue 21 (g): do the budget selections and the per-layer MACs stay the same when a MAC counter changes?

    python benchmarks/mac_counter_check.py save before.json     # on the commit before the change
    python benchmarks/mac_counter_check.py compare before.json  # after it: lists every entry that differs

Saved: the keep masks of `select_budget` (MACs 50% and 30%, params 50%; random scores, seeded) with their cost on
ResNet-20 (internal and coupled scopes) and MobileNetV2 (internal), `width.skipped.layer_macs` per layer and
`skipped_macs_share` on those and on DARTS' evaluation net, PreResNet-20 and the tiny MobileNetV2.

Issue 21 (g) ran it with layer_macs on torch-pruning's counter: every selection and cost was identical, the
classifiers gained their bias (10 MACs on ResNet-20), so width.skipped kept its own count.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from slimrarts.models import create_model
from slimrarts.width import attach_gates, build_cost_model, select_budget
from slimrarts.width.skipped import layer_macs, skipped_macs_share

BUDGETS = (("macs", "50%"), ("macs", "30%"), ("params", "50%"))


def _gates(name: str, scope: list[str]):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, attach_gates(model, torch.randn(2, 3, 32, 32), scope=scope)


def state() -> dict:
    out = {}
    for name, scope in (("resnet20", ["internal"]), ("mobilenetv2_cifar", ["internal"]), ("resnet20", ["coupled"])):
        model, gates = _gates(name, scope)
        cost_model = build_cost_model(gates)
        g = torch.Generator().manual_seed(1)
        scores = [torch.rand(a.shape, generator=g) for a in gates.alphas]
        tag = f"{name}/{'+'.join(scope)}"
        for kind, target in BUDGETS:
            keep = select_budget(scores, cost_model, target, kind, repeat=gates.repeats)
            out[f"{tag}/{kind}/{target}"] = [k.int().tolist() for k in keep]
            out[f"{tag}/{kind}/{target}/cost"] = list(cost_model(keep))
        out[f"{tag}/layer_macs"] = layer_macs(model, torch.randn(1, 3, 32, 32))
        out[f"{tag}/skipped_share"] = skipped_macs_share(gates) if gates.skipped else 0.0
    for name in ("darts_cifar", "preresnet20", "tiny_mobilenetv2"):
        model, gates = _gates(name, ["coupled"])
        out[f"{name}/layer_macs"] = layer_macs(model, torch.randn(1, 3, 32, 32))
        out[f"{name}/skipped_share"] = skipped_macs_share(gates) if gates.skipped else 0.0
    return json.loads(json.dumps(out))


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    now = state()
    if mode == "save":
        with open(path, "w") as fh:
            json.dump(now, fh, indent=0)
        print(f"saved {len(now)} entries")
        return
    with open(path) as fh:
        before = json.load(fh)
    bad = [k for k in before if before[k] != now.get(k)]
    for k in bad:
        if isinstance(before[k], dict):
            diffs = {layer: (v, now[k].get(layer)) for layer, v in before[k].items() if v != now[k].get(layer)}
            print(f"differs: {k}: {diffs}")
        else:
            print(f"differs: {k}: {before[k]} -> {now.get(k)}")
    print("identical" if not bad else f"{len(bad)} of {len(before)} entries differ")


if __name__ == "__main__":
    main()
