"""Cut quality at several MACs budgets: the trained ResNet-20's test accuracy right after the cut, no fine-tuning.

    SLIMRARTS_DATA=../shared/data python benchmarks/cut_quality.py

Which channels a method picks is seen most directly right after the cut (issue 13, item 5). For each budget (90%,
75%, 50%, 35% of the dense MACs, scope internal as in the CPU tier) every method's scores go through the same
`select_budget`, α folding and removal, and the slim model is evaluated on the 10,000 test images without any
training: the one-shot criteria (l1, taylor, fpgm, group-norm) and random scores on the trained dense model; rarts
with the α and the weights (y, the recipe's `final_weights`) of the CPU tier's rarts run, seed 0
(`runs/cpu/rarts-s0/checkpoints/search.pt`, made by `benchmarks/cpu_table.py`), whose search trained the weights for
one epoch with the gates on. Results: benchmarks/results/cut_quality.json and the Markdown table it holds.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = ["90%", "75%", "50%", "35%"]
METHODS = ["rarts", "group-norm", "taylor", "l1", "fpgm", "random"]


def main() -> None:
    from slimrarts.baselines.criteria import score_channels
    from slimrarts.commands.width import load_weights
    from slimrarts.data import DeviceLoader, load_cifar, stats_for
    from slimrarts.engine import evaluate
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe
    from slimrarts.width import attach_gates, build_cost_model, remove_channels, select_budget

    recipe = load_recipe(ROOT / "recipes" / "width" / "cpu.yaml")
    torch.manual_seed(0)
    dense = create_model("resnet20", num_classes=10)
    load_weights(dense, ROOT / recipe.model.weights)
    dense.eval()
    train, test = load_cifar("cifar10", None)
    mean, std = stats_for("cifar10")
    train_loader = DeviceLoader(train, recipe.data.batch_size, train=True, mean=mean, std=std, seed=0)
    test_loader = DeviceLoader(test, 1000, train=False, mean=mean, std=std)
    example = torch.randn(2, 3, 32, 32)
    search = ROOT / "runs" / "cpu" / "rarts-s0" / "checkpoints" / "search.pt"

    def start(method: str):
        """The model the method cuts, its gates (α set) and its scores."""
        model = copy.deepcopy(dense)
        if method == "rarts":
            ckpt = torch.load(search, weights_only=True, map_location="cpu")
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            with torch.no_grad():
                for k, v in ckpt["y"].items():
                    params[k].copy_(v)
                for k, v in ckpt["y_buffers"].items():
                    buffers[k].copy_(v)
        gates = attach_gates(model, example, recipe.prune.scope, warn=False)
        if method == "rarts":
            with torch.no_grad():
                for a, v in zip(gates.alphas, ckpt["arch"], strict=True):
                    a.copy_(v)
            scores = [a.detach().abs() for a in gates.alphas]
        elif method == "random":
            g = torch.Generator().manual_seed(0)
            scores = [torch.rand(a.shape, generator=g) for a in gates.alphas]
        else:
            scores = score_channels(method, gates, train_loader, batches=recipe.search.taylor_batches).scores
        return gates, scores

    rows = {}
    base = evaluate(dense, test_loader)["acc"]
    print(f"dense: {100 * base:.2f}%", flush=True)
    for method in METHODS:
        if method == "rarts" and not search.is_file():
            print(f"skip rarts: {search} is missing (run benchmarks/cpu_table.py first)", flush=True)
            continue
        rows[method] = {}
        for budget in BUDGETS:
            gates, scores = start(method)
            cost = build_cost_model(gates)
            keep = select_budget(scores, cost, budget, "macs", min_channels=recipe.prune.min_channels)
            remove_channels(gates, keep)
            acc = evaluate(gates.model.eval(), test_loader)["acc"]
            rows[method][budget] = acc
            print(f"{method} at {budget} of the MACs: {100 * acc:.2f}%", flush=True)
    head = "| method | " + " | ".join(f"{b} of the MACs" for b in BUDGETS) + " |"
    lines = [head, "|" + "---|" * (len(BUDGETS) + 1)]
    lines += [f"| {m} | " + " | ".join(f"{100 * r[b]:.2f}" for b in BUDGETS) + " |" for m, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    write_result("cut_quality", {"command": " ".join(sys.argv), "dense_acc": base, "budgets": BUDGETS,
                                 "rows": rows, "table": table, "machine": machine(torch.device("cpu"))})


if __name__ == "__main__":
    main()
