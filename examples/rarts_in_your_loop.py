"""RARTS width search inside a training loop of your own, in plain PyTorch (README: "Use your own training loop").

    python examples/rarts_in_your_loop.py --data ../shared/data/cifar10-jpg.tar.gz --epochs 1

Your data (any loaders of `(images, labels)`), your epochs, your learning-rate schedule; slimrarts supplies the
width gates, RARTS' three-step update of the two weight copies and α, the selection, and the exact cut. The slim
model is an ordinary nn.Module: fine-tune it with your loop too.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import slimrarts


def search_and_cut(model, train_t, train_v, train_all, *, epochs: int, budget: str = "50%", device: str = "cpu"):
    """RARTS on the two halves `train_t` / `train_v` for `epochs`, then a cut to `budget` of the MACs with the
    BatchNorm statistics re-estimated on `train_all`; returns the slim model."""
    model = model.to(device)
    x, _ = next(iter(train_t))
    search = slimrarts.WidthSearch(model, x[:8].float().to(device), method="rarts",
                                   config={"search": {"score": "grad", "optim": {"lr": 0.02}},
                                           "prune": {"scope": ["internal"]}})
    steps = epochs * min(len(train_t), len(train_v))
    # the learning rates are yours: here a cosine for both weight copies, α's Adam left constant
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(search.optimizers[k], T_max=steps) for k in ("w", "y")]
    for _ in range(epochs):
        for batch_t, batch_v in zip(train_t, train_v, strict=False):
            search.step(batch_t, batch_v)  # one RARTS iteration: w on D_t, y and α on D_v
            for s in schedules:
                s.step()
    return search.cut(budget={"macs": budget}, recalibrate=train_all)


def finetune(model, loader, *, epochs: int, lr: float = 0.01, device: str = "cpu") -> None:
    """An ordinary loop over the slim model."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.float().to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model, loader, device: str = "cpu") -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x.float().to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return right / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10: cifar10-jpg.tar.gz, an ImageFolder or torchvision folder")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--weights", default="weights/resnet20_cifar10.pt", help="the trained ResNet-20 to start from")
    args = ap.parse_args()
    from slimrarts.data import make_loaders
    from slimrarts.models import create_model
    from slimrarts.recipe import DataConfig

    loaders = make_loaders(DataConfig(name="cifar10", root=args.data, download=False), torch.device("cpu"))
    model = create_model("resnet20", num_classes=10)
    state = torch.load(args.weights, map_location="cpu")
    model.load_state_dict(state.get("state_dict", state))  # a `slimrarts train` model.pt, or a plain state_dict
    slim = search_and_cut(model, loaders.search_t, loaders.search_v, loaders.train, epochs=args.epochs)
    finetune(slim, loaders.train, epochs=args.epochs)
    print(f"slim ResNet-20: {sum(p.numel() for p in slim.parameters())} parameters, test accuracy "
          f"{accuracy(slim, loaders.test):.4f}")


if __name__ == "__main__":
    main()
