"""One rank of the user's own DDP loop around `slimrarts.WidthSearch` (test_your_loop_ddp.py runs two under
torchrun, gloo): a one-net search (`joint`) with the model in the user's DistributedDataParallel, and RARTS, not
wrapped, that the object keeps in step across the ranks. Each rank writes what it ended with to OUT/rank<r>.pt.

    torchrun --standalone --nproc_per_node=2 tests/your_loop_worker.py OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import slimrarts
from slimrarts.models import create_model

CONFIG = {"seed": 0, "device": "cpu", "search": {"optim": {"lr": 0.05}, "optim_arch": {"lr": 0.05}},
          "prune": {"scope": ["internal"], "mode": "ratio", "ratio": 0.4, "recalibrate": 2},
          "report": {"latency": False}}


def main(out: str) -> None:
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(160, 3, 32, 32, generator=g), torch.randint(0, 10, (160,), generator=g)

    def shard(indices: torch.Tensor, batch: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Global batches of `batch` images; this rank's share of each (the ranks see different images)."""
        out = []
        for i in range(0, len(indices), batch):
            mine = indices[i:i + batch][rank::world]
            out.append((images[mine], labels[mine]))
        return out

    calibration = shard(torch.arange(40))
    ended = {}

    # one-net: the user's DDP averages the weights' gradients, regularize() averages α's
    torch.manual_seed(0)
    model = create_model("tiny_preresnet")
    search = slimrarts.WidthSearch(model, images[:8], method="joint", config=CONFIG)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in shard(torch.arange(160)):
        F.cross_entropy(ddp(x), y).backward()
        search.regularize()
        optimizer.step()
        optimizer.zero_grad()
    ended["joint"] = {"alphas": [a.detach().clone() for a in search.alphas]}
    search.cut(recalibrate=calibration)
    ended["joint"].update(slim=model.state_dict(), kept=[g["kept"] for g in search.spec["groups"]])

    # two-net: not wrapped in DDP; step() averages the gradients of w, y and α over the ranks
    torch.manual_seed(0)
    model = create_model("tiny_preresnet")
    search = slimrarts.WidthSearch(model, images[:8], method="rarts", config=CONFIG)
    for batch_t, batch_v in zip(shard(torch.arange(0, 160, 2)), shard(torch.arange(1, 160, 2)), strict=True):
        search.step(batch_t, batch_v)
    search.sync_buffers()  # the epoch's end: the running statistics (each rank's own so far) averaged
    ended["rarts"] = {"alphas": [a.detach().clone() for a in search.alphas],
                      "y": {k: v.detach().clone() for k, v in search.state.y.items()},
                      "w": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    search.cut(recalibrate=calibration)
    ended["rarts"].update(slim=model.state_dict(), kept=[g["kept"] for g in search.spec["groups"]])
    torch.save(ended, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
