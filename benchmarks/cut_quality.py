"""Cut quality at several MACs budgets, with and without BN recalibration: the trained ResNet-20 right after the cut.

    SLIMRARTS_DATA=../shared/data python benchmarks/cut_quality.py

Which channels a method picks is seen most directly right after the cut, before any fine-tuning (issue 13, item 5).
Stale BatchNorm statistics hide it (issue 20): so each cell gives the accuracy on the 10,000 test images with the
statistics the model had ("cut") and after `prune.recalibrate`'s recalibration (40 training batches of 128, train
mode, no gradients; "recal"). For each budget (90%, 75%, 50%, 35%, 25% of the dense MACs, scope internal as in the
CPU tier) every score goes through the same `select_budget`, α folding and removal:

- the one-shot criteria (l1, taylor, fpgm, group-norm), the dense BN |γ| (per group mean-normalised) and random
  scores, on the trained dense model;
- RARTS after `recipes/width/cpu.yaml`'s one search epoch (weights y, the recipe's `final_weights`), ranked by
  |α| (the paper), |α·γ| and Σ|α ⊙ ∇_α| (`search.score`), and the same with `search.init: magnitude`;
- where RARTS' value lies (50% and 25%): per-group widths from {RARTS' |α|, group-norm, uniform} crossed with the
  channels within each group chosen by {RARTS' |α·γ|, group-norm, random}, all cut from RARTS' weights y.

The searches run here once (run folders under runs/cut_quality/, resumed if interrupted). Results:
benchmarks/results/cut_quality.json (written after every row, finished rows skipped on a rerun) with the Markdown
table it holds.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = ["90%", "75%", "50%", "35%", "25%"]
CRITERIA = ["group-norm", "taylor", "l1", "fpgm"]
SEARCHES = {"rarts": [], "rarts, magnitude start": ["search.init=magnitude"]}  # each also accumulates the grad score
SCORES = {"alpha": "|α|", "alpha_gamma": "|α·γ|", "grad": "Σ|α ⊙ ∇α|"}
CROSS_BUDGETS = ["50%", "25%"]
RECAL_BATCHES = 40
OUT = ROOT / "benchmarks" / "results" / "cut_quality.json"


def _search(name: str, overrides: list[str], loaders, device):
    """The model after `name`'s search (y in it) and its gates (α, importance), from runs/cut_quality/<name>."""
    from slimrarts.api import _take_final_weights, search_width
    from slimrarts.commands.width import load_weights
    from slimrarts.engine.rundir import RunDir, prepare_run_dir
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe, save_or_check_recipe

    recipe = load_recipe(ROOT / "recipes" / "width" / "cpu.yaml", [*overrides, "search.score=grad"])
    folder = ROOT / "runs" / "cut_quality" / name.replace(", ", "-").replace(" ", "-")
    resume = (folder / "recipe.yaml").is_file()
    prepare_run_dir(folder, resume=resume)
    save_or_check_recipe(recipe, folder, resume)
    torch.manual_seed(recipe.seed)
    model = create_model("resnet20", num_classes=10).to(device)
    load_weights(model, ROOT / recipe.model.weights)
    found = search_width(model, loaders, recipe, device=device, run_dir=RunDir(folder), resume=resume,
                         progress=False)
    _take_final_weights(model, found.state, recipe.search.final_weights)
    return model, found


def main() -> None:
    from slimrarts.baselines.criteria import score_channels
    from slimrarts.commands.width import load_weights
    from slimrarts.data import make_loaders
    from slimrarts.engine import evaluate
    from slimrarts.engine.recalibrate import recalibrate_bn
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe
    from slimrarts.width import attach_gates, build_cost_model, remove_channels, select_budget
    from slimrarts.width.scores import normalise_per_group, site_magnitude

    recipe = load_recipe(ROOT / "recipes" / "width" / "cpu.yaml")
    device = torch.device("cpu")
    loaders = make_loaders(recipe.data, device, seed=recipe.seed, channels_last=recipe.search.channels_last)
    torch.manual_seed(0)
    dense = create_model("resnet20", num_classes=10)
    load_weights(dense, ROOT / recipe.model.weights)
    dense.eval()
    example = torch.randn(2, 3, 32, 32)
    done = json.loads(OUT.read_text()) if OUT.is_file() else {}
    rows = done.get("rows", {}) if done.get("recal_batches") == RECAL_BATCHES else {}
    base = evaluate(dense, loaders.test)["acc"]
    print(f"dense: {100 * base:.2f}%", flush=True)

    def cut_row(name: str, start: torch.nn.Module, scores_of=None, keep_of=None, budgets=BUDGETS) -> None:
        if name in rows and all(b in rows[name] for b in budgets):
            print(f"{name}: done", flush=True)
            return
        rows[name] = {}
        for budget in budgets:
            model = copy.deepcopy(start)
            gates = attach_gates(model, example, recipe.prune.scope, warn=False)
            if keep_of is not None:
                keep = keep_of(gates, budget)
            else:
                keep = select_budget(scores_of(gates), build_cost_model(gates), budget, "macs",
                                     min_channels=recipe.prune.min_channels)
            remove_channels(gates, keep)
            model.eval()
            cut = evaluate(model, loaders.test)["acc"]
            recalibrate_bn(model, loaders.train, RECAL_BATCHES)
            recal = evaluate(model, loaders.test)["acc"]
            rows[name][budget] = {"cut": cut, "recal": recal}
            print(f"{name} at {budget} of the MACs: cut {100 * cut:.2f}% → recal {100 * recal:.2f}%", flush=True)
        _write(rows, base)

    g = torch.Generator().manual_seed(0)
    for method in CRITERIA:
        cut_row(method, dense, lambda gates, m=method: score_channels(
            m, gates, loaders.train, batches=recipe.baselines.taylor_batches).scores)
    cut_row("dense |γ|", dense, lambda gates: normalise_per_group(site_magnitude(gates)))
    cut_row("random", dense, lambda gates: [torch.rand(a.shape, generator=g) for a in gates.alphas])
    for name, overrides in SEARCHES.items():
        if all(f"{name} {label}" in rows for label in SCORES.values()) and all(
                b in rows[f"{name} {label}"] for label in SCORES.values() for b in BUDGETS):
            continue
        model, found = _search(name, overrides, loaders, device)
        alphas = [a.detach().clone() for a in found.gates.alphas]
        importance = [t.detach().clone() for t in found.importance]
        found.gates.remove()
        model.eval()

        for kind, label in SCORES.items():
            cut_row(f"{name} {label}", model, lambda gates, k=kind, a=alphas, i=importance: _loaded_scores(
                gates, k, a, i))

    # where RARTS' value lies: per-group widths from one source, the channels within each group by another, all cut
    # from RARTS' weights y (the network a RARTS run fine-tunes)
    model, found = _search("rarts", [], loaders, device)
    alphas = [a.detach().clone() for a in found.gates.alphas]
    importance = [t.detach().clone() for t in found.importance]
    found.gates.remove()
    model.eval()
    min_ch = recipe.prune.min_channels

    def widths(source: str, gates, budget: str) -> list[int]:
        cm = build_cost_model(gates)
        if source == "uniform":
            return _uniform_counts(cm, [g.size for g in gates.groups], budget, min_ch)
        if source == "rarts |α|":
            scores = _loaded_scores(gates, "alpha", alphas, importance)
        else:  # group-norm's own widths: scored on the dense model, as its runs are
            dense_gates = attach_gates(copy.deepcopy(dense), example, recipe.prune.scope, warn=False)
            scores = score_channels("group-norm", dense_gates, loaders.train).scores
        return [int(k.sum()) for k in select_budget(scores, cm, budget, "macs", min_channels=min_ch)]

    def within(selector: str, gates) -> list[torch.Tensor]:
        if selector == "random":
            gen = torch.Generator().manual_seed(0)
            return [torch.rand(a.shape, generator=gen) for a in gates.alphas]
        if selector == "group-norm":
            return score_channels("group-norm", gates, loaders.train).scores
        return _loaded_scores(gates, "alpha_gamma", alphas, importance)

    for source in ("rarts |α|", "group-norm", "uniform"):
        for selector in ("rarts |α·γ|", "group-norm", "random"):
            cut_row(f"widths {source} × channels {selector}", model, keep_of=lambda gates, b, so=source, se=selector:
                    _top_k(within(se, gates), widths(so, gates, b)), budgets=CROSS_BUDGETS)


def _uniform_counts(cm, sizes: list[int], budget: str, min_ch: int) -> list[int]:
    """The same share of every group (at least `min_ch`), the largest whose MACs fit `budget` (bisection)."""
    target = float(budget.rstrip("%")) / 100 * cm.dense[0]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        counts = [max(min_ch, int(mid * n)) for n in sizes]
        lo, hi = (mid, hi) if cm(counts)[0] <= target else (lo, mid)
    return [max(min_ch, int(lo * n)) for n in sizes]


def _top_k(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Keep masks of the `counts[g]` highest scores of each group."""
    out = []
    for s, k in zip(scores, counts, strict=True):
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.topk(s.detach().flatten().float().cpu(), k).indices] = True
        out.append(keep)
    return out


def _loaded_scores(gates, kind: str, alphas: list[torch.Tensor], importance: list[torch.Tensor]):
    """`search.score` = `kind` of fresh gates set to a search's α (and its accumulated importance)."""
    from slimrarts.width.scores import search_scores

    with torch.no_grad():
        for a, v in zip(gates.alphas, alphas, strict=True):
            a.copy_(v)
    return search_scores(gates, kind, importance)


def _write(rows: dict, base: float) -> None:
    head = "| scores | " + " | ".join(f"{b} of the MACs: cut → recal" for b in BUDGETS) + " |"
    lines = [head, "|" + "---|" * (len(BUDGETS) + 1)]
    for m, r in rows.items():
        cells = [f"{100 * r[b]['cut']:.1f} → {100 * r[b]['recal']:.1f}" if b in r else "" for b in BUDGETS]
        lines.append(f"| {m.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    write_result("cut_quality", {"command": " ".join(sys.argv), "dense_acc": base, "budgets": BUDGETS,
                                 "recal_batches": RECAL_BATCHES, "rows": rows, "table": table,
                                 "machine": machine(torch.device("cpu"))})


if __name__ == "__main__":
    main()
