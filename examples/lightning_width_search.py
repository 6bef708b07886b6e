"""Width search inside a Lightning training (README: "Use your own training loop"; needs the lightning extra).

    pip install 'slimrarts[lightning]'
    python examples/lightning_width_search.py --data ../shared/data/cifar10-jpg.tar.gz --epochs 1

Your LightningModule trains as it always does; `WidthSearchCallback` learns α alongside (here the one-net `joint`
search, one α step per optimizer step), cuts the model to half its MACs at the end of that fit and re-estimates the
BatchNorm statistics; a second `Trainer.fit` fine-tunes the slim model, and its checkpoint reloads through
`load_slim_checkpoint`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from slimrarts.integrations.lightning import WidthSearchCallback, load_slim_checkpoint


class Classifier(pl.LightningModule):
    """An ordinary LightningModule around any CNN (`self.net`)."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.02):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, self.trainer.estimated_stepping_batches))}


def trainer(epochs: int, callbacks, **kw) -> pl.Trainer:
    kw = {"accelerator": "auto", "devices": 1, "logger": False, "enable_model_summary": False, **kw}
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, **kw)


def search_cut_finetune(module: Classifier, train, *, epochs: int, budget: str = "50%", root: str | Path = "runs/pl",
                        checkpoint: str | Path | None = None, **trainer_kw) -> Classifier:
    """Search and cut (`epochs`), then fine-tune (`epochs`); Lightning's own checkpoints go under `root`; the slim
    module's final checkpoint to `checkpoint` if given."""
    trainer_kw = {"default_root_dir": str(root), **trainer_kw}
    x, _ = next(iter(train))
    search = WidthSearchCallback(x[:8].float(), method="joint", module="net", budget={"macs": budget},
                                 config={"search": {"score": "grad"}, "prune": {"scope": ["internal"]}})
    trainer(epochs, [search], **trainer_kw).fit(module, train)  # α learned with your training; cut at its end
    second = trainer(epochs, [search], **trainer_kw)  # the callback now only writes the width spec
    second.fit(module, train)
    if checkpoint is not None:
        second.save_checkpoint(checkpoint)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10: cifar10-jpg.tar.gz, an ImageFolder or torchvision folder")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--weights", default="weights/resnet20_cifar10.pt", help="the trained ResNet-20 to start from")
    ap.add_argument("--out", default="runs/pl/slim.ckpt")
    args = ap.parse_args()
    from slimrarts.data import make_loaders
    from slimrarts.models import create_model
    from slimrarts.recipe import DataConfig

    loaders = make_loaders(DataConfig(name="cifar10", root=args.data, download=False), torch.device("cpu"))
    net = create_model("resnet20", num_classes=10)
    state = torch.load(args.weights, map_location="cpu")
    net.load_state_dict(state.get("state_dict", state))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    slim = search_cut_finetune(Classifier(net), loaders.train, epochs=args.epochs, checkpoint=args.out)
    again = load_slim_checkpoint(Classifier(create_model("resnet20", num_classes=10)), args.out)
    print(f"slim ResNet-20: {sum(p.numel() for p in slim.parameters())} parameters; {args.out} reloads with "
          f"{sum(p.numel() for p in again.parameters())}")


if __name__ == "__main__":
    main()
