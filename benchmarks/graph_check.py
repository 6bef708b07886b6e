"""Check that CUDA-graph-captured steps compute what eager steps compute (fp32, same data, same start).

    python benchmarks/graph_check.py --model preresnet20 --steps 30

Trains one copy eagerly and one through `GraphedStep` (plain training, then a rarts search), and reports the
largest parameter and α differences after the same batches. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_tag, machine, write_result  # noqa: E402

from slimrarts.data import DeviceLoader, ImageSet, load_cifar, split_halves  # noqa: E402
from slimrarts.engine import fit  # noqa: E402
from slimrarts.models import create_model  # noqa: E402
from slimrarts.recipe import ArchOptimConfig, OptimConfig, TrainConfig  # noqa: E402
from slimrarts.search.loop import run_search  # noqa: E402
from slimrarts.search.problem import NetProblem, make_state  # noqa: E402
from slimrarts.width import attach_gates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="preresnet20")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    train, _ = load_cifar("cifar10", args.data)
    n = args.steps * args.batch
    data = ImageSet(train.images[:n].clone(), train.labels[:n].clone(), train.classes)
    out = {}
    optim = OptimConfig(lr=0.05, schedule="constant")
    finals = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = create_model(args.model).to(device)
        cfg = TrainConfig(epochs=1, optim=optim, cuda_graph=graph, log_every=10**9)
        res = fit(model, DeviceLoader(data, args.batch, train=True, device=device), None, cfg=cfg, device=device,
                  progress=False)
        finals.append((model.state_dict(), res.history[-1]))
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(finals[0][0].values(),
                                                                         finals[1][0].values(), strict=True))
    out["train"] = {"max_param_diff": diff, "captured": finals[1][1]["cuda_graph"],
                    "loss_eager": finals[0][1]["train_loss"], "loss_graph": finals[1][1]["train_loss"]}
    idx_t, idx_v = split_halves(data.labels)
    finals = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = create_model(args.model).to(device)
        gates = attach_gates(model, torch.randn(2, 3, 32, 32, device=device), ["internal", "branch-input"])
        problem = NetProblem(model, gates.alphas)
        state = make_state(model, gates.alphas, "rarts", optim_w=optim, optim_arch=ArchOptimConfig(lr=1e-2),
                           beta=1e-3)
        lt = DeviceLoader(data, args.batch, train=True, device=device, indices=idx_t, seed=1)
        lv = DeviceLoader(data, args.batch, train=True, device=device, indices=idx_v, seed=2)
        res = run_search(problem, state, "rarts", epochs=1, optim_w=optim, loader_t=lt, loader_v=lv, progress=False,
                         cuda_graph=graph)
        finals.append(([a.detach().clone() for a in gates.alphas], {k: v.detach().clone() for k, v in state.y.items()},
                       res.history[-1]))
    a_diff = max((a - b).abs().max().item() for a, b in zip(finals[0][0], finals[1][0], strict=True))
    y_diff = max((finals[0][1][k] - finals[1][1][k]).abs().max().item() for k in finals[0][1])
    out["search_rarts"] = {"max_alpha_diff": a_diff, "max_y_diff": y_diff, "captured": finals[1][2]["cuda_graph"],
                           "t_loss_eager": finals[0][2].get("t_loss"), "t_loss_graph": finals[1][2].get("t_loss")}
    path = write_result(f"graph_check_{device_tag(device)}", {"command": " ".join(sys.argv), **out,
                                                               "machine": machine(device)})
    print(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
