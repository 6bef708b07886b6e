"""Training throughput: slimrarts' loader + engine vs a bare PyTorch loop over pre-loaded tensors (same model).

    python benchmarks/loader_throughput.py --model preresnet56 --batch 128 --steps 12 [--device cuda]

The bare loop iterates pre-normalised float tensors already on the device (no augmentation) with torch.optim.SGD;
ours runs `slimrarts.engine.fit` on a `DeviceLoader` with random crop + flip on the device. Both train the same
model for the same number of steps after a warm-up epoch; the figure is images/s of the timed epoch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, machine, sync, write_result  # noqa: E402

from slimrarts.data import DeviceLoader, ImageSet, load_cifar, stats_for  # noqa: E402
from slimrarts.engine import fit, resolve_device  # noqa: E402
from slimrarts.models import create_model  # noqa: E402
from slimrarts.recipe import OptimConfig, TrainConfig  # noqa: E402


def bare(model, x, y, batch, steps, device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True)
    model.train()
    for _epoch in range(2):
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(len(y), device=device)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        dt = time.perf_counter() - t0
    return steps * batch / dt


def ours(model, data, batch, device, cfg) -> float:
    loader = DeviceLoader(data, batch, train=True, device=device, seed=0)
    result = fit(model, loader, None, cfg=cfg, device=device, progress=False)
    return result.history[-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preresnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: $SLIMRARTS_DATA, cache, download)")
    ap.add_argument("--repeats", type=int, default=2, help="alternate bare/ours this many times, report the best")
    args = ap.parse_args()
    device = resolve_device(args.device)
    train, _ = load_cifar("cifar10", args.data)
    n = args.steps * args.batch
    data = ImageSet(train.images[:n].clone(), train.labels[:n].clone(), train.classes)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in stats_for("cifar10"))
    x = ((data.images.to(device).float() / 255) - mean) / std
    y = data.labels.to(device)
    cfg = TrainConfig(epochs=2, optim=OptimConfig(lr=0.05, schedule="constant"), log_every=10**9)
    runs = {"bare": [], "ours": []}
    for _ in range(args.repeats):
        torch.manual_seed(0)
        runs["bare"].append(bare(create_model(args.model).to(device), x, y, args.batch, args.steps, device))
        torch.manual_seed(0)
        runs["ours"].append(ours(create_model(args.model).to(device), data, args.batch, device, cfg))
    best = {k: max(v) for k, v in runs.items()}
    ratio = best["ours"] / best["bare"]
    payload = {"command": " ".join(sys.argv), "model": args.model, "batch": args.batch, "steps": args.steps,
               "images_per_s": best, "all_runs": runs, "ours_over_bare": ratio, "machine": machine(device)}
    path = write_result(f"loader_throughput_{device_tag(device)}", payload)
    print(f"| {args.model} | {args.batch} | {best['bare']:.0f} | {best['ours']:.0f} | {ratio:.3f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
