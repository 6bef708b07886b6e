"""Seconds per iteration of each search method on the DARTS search net, and the ratio to second-order DARTS.

    python benchmarks/darts_cost.py --device cpu --channels 8 --layers 5 --batch 32 --iters 5
    python benchmarks/darts_cost.py --device cuda            # DARTS' size: 16 channels, 8 cells, batch 64

Every method runs on a fresh search net built with the same seed, on the same random D_t/D_v batches already on
the device (the cost of an iteration does not depend on the pixels). Each iteration is timed on its own after
`--warmup` untimed ones, methods take turns round by round (so a busy machine slows them alike), and the figure
is the median. Per epoch = per iteration × the iterations of one DARTS epoch (25,000 D_t images / batch). The
RARTS paper reports RARTS' search at about 35% of second-order DARTS' cost (1.1 vs 3.1 GPU days on its machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, machine, sync, write_result  # noqa: E402

from slimrarts.engine import resolve_device  # noqa: E402
from slimrarts.nas import SearchNetwork  # noqa: E402
from slimrarts.nas.recipe import NasSearchConfig  # noqa: E402
from slimrarts.search import get_search  # noqa: E402
from slimrarts.search.problem import NetProblem, make_state  # noqa: E402

HALF = 25_000  # images in each half of CIFAR-10's training set


def _setup(method: str, args, device: torch.device):
    cfg = NasSearchConfig()  # DARTS' optimizer settings
    torch.manual_seed(0)
    net = SearchNetwork(C=args.channels, layers=args.layers).to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    problem = NetProblem(net, net.arch)
    state = make_state(net, net.arch, method, optim_w=cfg.optim, optim_arch=cfg.arch, lam=cfg.lam, beta=cfg.beta)
    return problem, state


def _batches(args, device: torch.device):
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def one():
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
        return x, torch.randint(0, 10, (args.batch,), generator=g).to(device)
    return one(), one()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations per method first")
    ap.add_argument("--methods", nargs="+", default=["darts2", "darts1", "milenas", "rarts", "rarts-jacobi"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    if "darts2" not in args.methods:
        ap.error("--methods must include darts2 (the reference of the ratios)")
    device = resolve_device(args.device)
    batch_t, batch_v = _batches(args, device)
    runs = {m: _setup(m, args, device) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for rnd in range(args.warmup + args.iters):
        for m, (problem, state) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            get_search(m).step(problem, state, batch_t, batch_v)
            sync(device)
            if rnd >= args.warmup:
                times[m].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.warmup + args.iters}", file=sys.stderr, flush=True)
    iters_per_epoch = HALF // args.batch
    ref = float(np.median(times["darts2"]))
    rows = {}
    for m in args.methods:
        s = float(np.median(times[m]))
        rows[m] = {"passes": get_search(m).passes, "s_per_iter": s,
                   "s_per_iter_p10": float(np.percentile(times[m], 10)),
                   "s_per_iter_p90": float(np.percentile(times[m], 90)), "s_per_epoch": s * iters_per_epoch,
                   "ratio_to_darts2": s / ref, "paper": get_search(m).source}
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    payload = {"command": f"{env}python " + " ".join(sys.argv), "channels": args.channels, "layers": args.layers,
               "batch": args.batch, "iters": args.iters, "warmup": args.warmup, "channels_last": args.channels_last,
               "iters_per_epoch": iters_per_epoch, "rows": rows, "machine": machine(device)}
    path = write_result(f"darts_cost_{device_tag(device)}", payload)
    print(f"search net C={args.channels}, {args.layers} cells, batch {args.batch}; {device_tag(device)}, "
          f"{torch.get_num_threads()} threads; median of {args.iters} iterations")
    print("| method | passes/iter | s / iteration | s / epoch (25k/batch iters) | × darts2 |")
    print("|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['passes']} | {r['s_per_iter']:.3f} | {r['s_per_epoch']:.0f} | {r['ratio_to_darts2']:.2f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
