"""λ, β, α-learning-rate and search-length sensitivity of RARTS width search, judged on held-out *training* images.

    python benchmarks/sensitivity.py --tier mini --configs "lam=1,beta=1e-4" "lam=1,beta=1e-3" ...
    python benchmarks/sensitivity.py --tier cpu --set data.limit_per_class=2000 --holdout 500 \
        --configs base lam=0.5 lam=2 beta=1e-4 beta=1e-2 alr=3e-3 alr=3e-2 epochs=2

With `base` (the recipe as it is) among the configs, the rule is one knob at a time: each knob takes the value whose
held-out accuracy after fine-tuning is highest (the recipe's own value unless another beats it), printed as the
settings to use. A recipe with `model.weights` starts from those weights.

Chooses the defaults without looking at the test set: the run trains and searches on `limit_per_class` images per
class of CIFAR-10's training set and is scored on a disjoint held-out slice of the same training set (the next
`--holdout` images per class). Each config is one `slimrarts.prune` run of recipes/width/<tier>.yaml (its own
selection: ratio or budget). Writes benchmarks/results/sensitivity_<tier>.json after every config; run again with the
same settings, it skips the configs already there, so a long sweep can be finished over several sittings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _holdout_loaders(recipe, holdout: int, device):
    from slimrarts.data import DeviceLoader, Loaders, load_cifar, split_halves, stats_for

    train, _ = load_cifar(recipe.data.name, recipe.data.root)
    k = recipe.data.limit_per_class
    ranks = torch.zeros_like(train.labels)
    for c in range(train.num_classes):
        idx = (train.labels == c).nonzero().squeeze(1)
        ranks[idx] = torch.arange(len(idx))
    fit_set = train.subset((ranks < k).nonzero().squeeze(1))
    held = train.subset(((ranks >= k) & (ranks < k + holdout)).nonzero().squeeze(1))
    idx_t, idx_v = split_halves(fit_set.labels, seed=recipe.data.split_seed)
    mean, std = stats_for(recipe.data.name)
    kw = dict(device=device, mean=mean, std=std, channels_last=recipe.search.channels_last)
    b = recipe.data.batch_size
    return Loaders(train=DeviceLoader(fit_set, b, train=True, seed=recipe.seed, **kw),
                   test=DeviceLoader(held, recipe.data.eval_batch_size, train=False, **kw),
                   search_t=DeviceLoader(fit_set, b, train=True, indices=idx_t, seed=recipe.seed + 1, **kw),
                   search_v=DeviceLoader(fit_set, b, train=True, indices=idx_v, seed=recipe.seed + 2, **kw),
                   num_classes=train.num_classes)


SHORT = {"lam": "search.lam", "beta": "search.beta", "alr": "search.optim_arch.lr", "method": "search.method",
         "epochs": "search.epochs"}


def _rule(rows: list[dict]) -> tuple[str, list[str]]:
    """With a `base` row: for each knob, the value with the best mean held-out accuracy (base's value on ties).
    Returns the rule's text and the chosen overrides (dotted keys) that differ from the recipe."""
    mean = {c: statistics.fmean(r["heldout_acc"] for r in rows if r["config"] == c)
            for c in dict.fromkeys(r["config"] for r in rows)}
    if "base" not in mean:
        return "", []
    knobs: dict[str, list[tuple[str, float]]] = {}
    for c, acc in mean.items():
        if c != "base" and "," not in c:
            k, _, v = c.partition("=")
            knobs.setdefault(k, []).append((v, acc))
    out, chosen = [], []
    for k, options in knobs.items():
        v, acc = max(options, key=lambda o: o[1])
        if acc > mean["base"]:
            out.append(f"{k}={v}")
            chosen.append(f"{SHORT.get(k, k)}={v}")
        else:
            out.append(f"{k}=recipe's")
    return ", ".join(out), chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default="mini")
    ap.add_argument("--configs", nargs="+", required=True,
                    help="comma-separated overrides per config; short keys lam, beta, alr mean search.lam, "
                         "search.beta, search.optim_arch.lr")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--holdout", type=int, default=100)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from slimrarts import prune
    from slimrarts.commands.width import load_weights
    from slimrarts.engine import resolve_device
    from slimrarts.models import create_model
    from slimrarts.recipe import load_recipe

    short = SHORT
    settings = {"tier": args.tier, "holdout": args.holdout, "overrides": args.overrides}
    result_file = ROOT / "benchmarks" / "results" / f"sensitivity_{args.tier}.json"
    previous = json.loads(result_file.read_text()) if result_file.is_file() else {}
    same = previous.get("settings") == settings
    done = {(r["config"], r["seed"]): r for r in previous.get("rows", [])} if same else {}
    rows = []
    for cfg in args.configs:
        over = []
        for item in cfg.split(","):
            if item.strip() == "base":
                continue
            k, _, v = item.partition("=")
            over.append(f"{short.get(k.strip(), k.strip())}={v.strip()}")
        for seed in args.seeds:
            if (cfg, seed) in done:
                rows.append(done[cfg, seed])
                print(f"{cfg} seed {seed}: done in an earlier sitting ({result_file.name})", flush=True)
                continue
            recipe = load_recipe(ROOT / "recipes" / "width" / f"{args.tier}.yaml", [*args.overrides, *over,
                                                                                   f"seed={seed}"])
            device = resolve_device(recipe.device)
            loaders = _holdout_loaders(recipe, args.holdout, device)
            torch.manual_seed(seed)
            model = create_model(recipe.model.name, num_classes=loaders.num_classes, **recipe.model.kwargs)
            if recipe.model.weights:
                load_weights(model, ROOT / recipe.model.weights)
            rep = prune(model, loaders, config=recipe, progress=False).report
            rows.append({"config": cfg, "seed": seed, "heldout_acc": rep["accuracy"]["slim_after_finetune"],
                         "heldout_acc_before_finetune": rep["accuracy"]["slim_before_finetune"],
                         "search_s": rep["time_s"]["search"]})
            print(f"{cfg} seed {seed}: held-out acc {rows[-1]['heldout_acc']:.4f} "
                  f"(before fine-tune {rows[-1]['heldout_acc_before_finetune']:.4f})", flush=True)
            write_result(f"sensitivity_{args.tier}", {"command": " ".join(sys.argv), "settings": settings,
                                                      "rows": rows, "finished": False,
                                                      "machine": machine(resolve_device("cpu"))})
    lines = ["| config | held-out acc % (after fine-tune) | before fine-tune % | seeds |", "|---|---|---|---|"]
    for cfg in args.configs:
        rs = [r for r in rows if r["config"] == cfg]
        acc = [100 * r["heldout_acc"] for r in rs]
        acc0 = [100 * r["heldout_acc_before_finetune"] for r in rs]
        sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        lines.append(f"| {cfg} | {statistics.fmean(acc):.2f}{sd} | {statistics.fmean(acc0):.2f} | {len(rs)} |")
    md = "\n".join(lines)
    rule, chosen = _rule(rows)
    if rule:
        md += "\n\nOne knob at a time, best held-out accuracy after fine-tuning: " + rule
    path = write_result(f"sensitivity_{args.tier}", {"command": " ".join(sys.argv), "settings": settings,
                                                     "rows": rows, "finished": True, "table": md,
                                                     "rule": rule, "chosen": chosen,
                                                     "machine": machine(resolve_device("cpu"))})
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
