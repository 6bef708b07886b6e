"""One rank of a Lightning `Trainer(strategy="ddp")` with `WidthSearchCallback` (test_lightning.py runs two under
torchrun, gloo, CPU): each rank writes its α and slim weights to OUT/rank<r>.pt.

    torchrun --standalone --nproc_per_node=2 tests/lightning_ddp_worker.py OUT
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from slimrarts.integrations.lightning import WidthSearchCallback
from slimrarts.models import create_model

CONFIG = {"seed": 0, "device": "cpu", "search": {"optim_arch": {"lr": 0.05}},
          "prune": {"scope": ["internal"], "mode": "ratio", "ratio": 0.4, "recalibrate": 2},
          "report": {"latency": False}}


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = create_model("tiny_preresnet")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(160, 3, 32, 32, generator=g),
                                          torch.randint(0, 10, (160,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=10)  # Lightning gives each rank its shard
    cb = WidthSearchCallback(data.tensors[0][:8], config=CONFIG, module="net")
    module = Classifier()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    trainer.fit(module, loader)
    torch.save({"alphas": [a.detach() for a in cb.search.alphas], "slim": module.state_dict(),
                "kept": [g["kept"] for g in cb.spec["groups"]]}, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
