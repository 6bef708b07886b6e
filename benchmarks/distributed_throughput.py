"""Images/s of a RARTS search epoch in one process and in several (torchrun, gloo on CPUs), same global batch.

    python benchmarks/distributed_throughput.py --data ../shared/data/cifar10-jpg.tar.gz        # 1x2 and 2x1 on CPU
    python benchmarks/distributed_throughput.py --nccl-smoke --device cuda                        # one GPU: NCCL smoke

Runs the library's own search phase (gates, `NetProblem`, `run_search` with rarts, loaders sharded per rank) on a
CIFAR-10 subset: one process with 2 threads (no process group: the plain path), then 2 processes with 1 thread each
under `torchrun --standalone` (each takes half of every global batch; gradients of w, y and α averaged before each
of the three steps). The figure is training images per second of the timed epochs (all but the first), counted over
all ranks, wall time of rank 0 (it waits for the slowest rank at each all-reduce); `collective_s` is the time rank
0 spends in the gradient all-reduces, waiting included. On a 2-core CPU expect little gain: the same cores do the
same arithmetic, plus the all-reduces. Take the figure on an otherwise idle machine: the load average before and
after is recorded. `--nccl-smoke` runs 1 process with NCCL on the GPU instead (a smoke test of the CUDA path).
Writes benchmarks/results/distributed_<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _worker(args) -> None:
    """One rank (or the single process): time `args.epochs` epochs of a rarts search; rank 0 prints a JSON line."""
    from slimrarts.data import DeviceLoader, ImageSet, load_cifar, split_halves
    from slimrarts.engine import Event, dist, on, resolve_device
    from slimrarts.models import create_model
    from slimrarts.recipe import ArchOptimConfig, OptimConfig
    from slimrarts.search.loop import run_search
    from slimrarts.search.problem import NetProblem, make_state
    from slimrarts.width import attach_gates

    torch.set_num_threads(args.threads)
    dist.init(args.device)
    device = resolve_device(args.device)
    shard = (dist.rank(), dist.world_size()) if dist.world_size() > 1 else None
    with dist.local_main_first():
        train, _ = load_cifar("cifar10", args.data)
    data = ImageSet(train.images[:args.images].clone(), train.labels[:args.images].clone(), train.classes)
    idx_t, idx_v = split_halves(data.labels)
    common = dict(device=device, shard=shard)
    lt = DeviceLoader(data, args.batch, train=True, indices=idx_t, seed=1, **common)
    lv = DeviceLoader(data, args.batch, train=True, indices=idx_v, seed=2, **common)
    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    gates = attach_gates(model, torch.randn(2, 3, 32, 32, device=device), ["internal", "branch-input"])
    problem = NetProblem(model, gates.alphas)
    optim = OptimConfig(lr=0.05, schedule="constant")
    state = make_state(model, gates.alphas, "rarts", optim_w=optim, optim_arch=ArchOptimConfig(lr=1e-3), beta=1e-3)
    spent = [0.0]
    reduce = dist.all_reduce_

    def timed_reduce(tensors, op="mean", **kw):  # the search's gradient all-reduces, waiting for the other rank
        t0 = time.perf_counter()
        reduce(tensors, op, **kw)
        spent[0] += time.perf_counter() - t0

    dist.all_reduce_ = timed_reduce
    marks = []

    def mark(state) -> None:
        marks.append(spent[0])

    result = run_search(problem, state, "rarts", epochs=args.epochs, optim_w=optim, loader_t=lt, loader_v=lv,
                        progress=False, callbacks=[on(Event.EPOCH_END, mark)])
    dist.all_reduce_ = reduce
    timed = result.history[1:]
    images = sum(h["images"] for h in timed)
    seconds = sum(h["epoch_s"] for h in timed)
    collective = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    if dist.is_main():
        print("RESULT " + json.dumps({
            "processes": dist.world_size(), "threads": torch.get_num_threads(), "backend": dist.backend(),
            "device": str(device), "images_per_s": images / seconds, "epoch_s": [h["epoch_s"] for h in timed],
            "images_per_epoch": timed[0]["images"], "collective_s": collective,
            "iterations_per_epoch": len(lt)}), flush=True)
    dist.shutdown()


def _launch(args, processes: int, threads: int, device: str) -> dict:
    """Run the worker in `processes` processes (torchrun for more than one, or for NCCL) of `threads` threads."""
    worker = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--device", device,
              "--model", args.model, "--batch", str(args.batch), "--images", str(args.images),
              "--epochs", str(args.epochs)] + (["--data", args.data] if args.data else [])
    if processes > 1 or device.startswith("cuda"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               *worker]
    else:
        cmd = [sys.executable, *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preresnet20")
    ap.add_argument("--batch", type=int, default=64, help="the global batch (each of N processes takes 1/N)")
    ap.add_argument("--images", type=int, default=2560, help="training images: halves D_t and D_v of half each")
    ap.add_argument("--epochs", type=int, default=3, help="epochs; all but the first are timed")
    ap.add_argument("--data", default=os.environ.get("SLIMRARTS_DATA"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nccl-smoke", action="store_true", help="one process on the GPU with NCCL instead")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    load_before = os.getloadavg()
    if args.nccl_smoke:
        rows = {"1x_gpu_nccl": _launch(args, 1, 1, "cuda")}
        assert rows["1x_gpu_nccl"]["backend"] == "nccl", rows
        name, device = "distributed_gpu", torch.device("cuda")
    else:
        rows = {"1x2": _launch(args, 1, 2, args.device), "2x1": _launch(args, 2, 1, args.device)}
        rows["2x1"]["speedup_vs_1x2"] = rows["2x1"]["images_per_s"] / rows["1x2"]["images_per_s"]
        name, device = "distributed_cpu", torch.device(args.device)
    payload = {"command": " ".join(["python", *sys.argv]), "model": args.model, "global_batch": args.batch,
               "images": args.images, "epochs": args.epochs, "timed_epochs": args.epochs - 1, "rows": rows,
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "cpu_count": os.cpu_count(), "machine": machine(device)}
    path = write_result(name, payload)
    print("| processes x threads | backend | images/s | s in all-reduces per epoch (rank 0) | epoch s |")
    print("|---|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['backend'] or 'none'} | {r['images_per_s']:.1f} | "
              f"{', '.join(f'{c:.2f}' for c in r['collective_s']) or '-'} | "
              f"{', '.join(f'{e:.2f}' for e in r['epoch_s'])} |")
    print(f"load average before {load_before[0]:.2f}, after {payload['load_average_after'][0]:.2f} "
          f"({os.cpu_count()} CPUs); wrote {path}")


if __name__ == "__main__":
    main()
