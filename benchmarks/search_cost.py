"""Cost of a search epoch per training image, relative to a plain training epoch (same model, data, machine).

    python benchmarks/search_cost.py --model preresnet56 --batch 64 --images 2048 \
        --methods rarts rarts-jacobi darts1 milenas darts2 [--device cuda --amp bf16 --channels-last --cuda-graph]

A plain epoch trains on N images; a search epoch of a split method pairs N/2 D_t images with N/2 D_v images (each
image seen once per epoch, in 2 to 6 passes depending on the method). Each figure is the seconds per image of the
second (timed) epoch; the ratio to the plain epoch is the cost. RARTS' ideal is 2.0 (four passes over two
half-batches against two over one batch); rarts-jacobi's is 1.0 plus the α bookkeeping.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, machine, write_result  # noqa: E402

from slimrarts.data import DeviceLoader, ImageSet, load_cifar, split_halves  # noqa: E402
from slimrarts.engine import fit, resolve_device  # noqa: E402
from slimrarts.models import create_model  # noqa: E402
from slimrarts.recipe import ArchOptimConfig, OptimConfig, TrainConfig  # noqa: E402
from slimrarts.search import get_search  # noqa: E402
from slimrarts.search.loop import run_search  # noqa: E402
from slimrarts.search.problem import NetProblem, make_state  # noqa: E402
from slimrarts.width import attach_gates  # noqa: E402


def _model(name, device, channels_last):
    torch.manual_seed(0)
    m = create_model(name).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preresnet56")
    ap.add_argument("--scope", nargs="+", default=["internal", "branch-input"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["rarts", "rarts-jacobi", "darts1", "milenas"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    train, _ = load_cifar("cifar10", args.data)
    data = ImageSet(train.images[:args.images].clone(), train.labels[:args.images].clone(), train.classes)
    optim = OptimConfig(lr=0.05, schedule="constant")
    common = dict(device=device, channels_last=args.channels_last)
    loader = DeviceLoader(data, args.batch, train=True, **common)
    model = _model(args.model, device, args.channels_last)
    attach_gates(model, torch.randn(2, 3, 32, 32, device=device), args.scope)  # plain training pays the gates too
    cfg = TrainConfig(epochs=2, optim=optim, amp=args.amp, channels_last=args.channels_last,
                      cuda_graph=args.cuda_graph, log_every=10**9)
    plain = fit(model, loader, None, cfg=cfg, device=device, progress=False).history[-1]
    plain_s = plain["epoch_s"] / plain["train_n"]
    rows = {"plain": {"s_per_image": plain_s, "ratio": 1.0, "passes": 1, "cuda_graph": plain["cuda_graph"]}}
    idx_t, idx_v = split_halves(data.labels)
    for method in args.methods:
        spec = get_search(method)
        model = _model(args.model, device, args.channels_last)
        gates = attach_gates(model, torch.randn(2, 3, 32, 32, device=device), args.scope)
        problem = NetProblem(model, gates.alphas, amp=args.amp)
        state = make_state(model, gates.alphas, method, optim_w=optim, optim_arch=ArchOptimConfig(lr=1e-3),
                           beta=1e-3)
        lt = DeviceLoader(data, args.batch, train=True, indices=idx_t, seed=1, **common)
        lv = DeviceLoader(data, args.batch, train=True, indices=idx_v, seed=2, **common)
        result = run_search(problem, state, method, epochs=2, optim_w=optim, loader_t=lt, loader_v=lv,
                            loader_whole=loader, channels_last=args.channels_last, progress=False,
                            cuda_graph=args.cuda_graph)
        last = result.history[-1]
        s = last["epoch_s"] / last["images"]
        rows[method] = {"s_per_image": s, "ratio": s / plain_s, "passes": spec.passes,
                        "cuda_graph": last["cuda_graph"]}
        print(f"{method}: {1e3 * s:.3f} ms/image, {s / plain_s:.2f} x plain", flush=True)
    payload = {"command": " ".join(sys.argv), "model": args.model, "batch": args.batch, "images": args.images,
               "amp": args.amp, "channels_last": args.channels_last, "cuda_graph": args.cuda_graph, "rows": rows,
               "machine": machine(device)}
    tag = f"{device_tag(device)}{'_graph' if args.cuda_graph else ''}"
    path = write_result(f"search_cost_{args.model}_{tag}", payload)
    print("| method | passes/iter | ms per training image | × plain epoch | CUDA graph |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['passes']} | {1e3 * r['s_per_image']:.3f} | {r['ratio']:.2f} | {r['cuda_graph']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
