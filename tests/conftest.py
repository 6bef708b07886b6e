"""Shared tiny data: a learnable 10-class image set, as an ImageSet and as an ImageFolder-layout archive."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml

from slimrarts.data import CIFAR10_CLASSES, DeviceLoader, ImageSet, Loaders, split_halves


def pytest_collection_modifyitems(config, items):
    """Under `make mutation` (mutmut sets MUTANT_UNDER_TEST and runs in mutants/, next to its timing stats), run a
    mutant's tests fastest first: with pytest's -x the mutant is then killed by its quickest failing test."""
    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "list_all_tests", "fail"):
        return
    stats = Path("mutmut-stats.json")
    if stats.is_file():
        seconds = json.loads(stats.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


def tiny_images(per_class: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose mean colour and a bright square's position depend on the class (so nets can learn)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.randint(0, 80, (len(labels), 3, size, size), generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, c % 3] += 60 + 10 * c
        r, q = divmod(c, 4)
        images[i, :, 4 + 8 * r: 10 + 8 * r, 4 + 7 * q: 10 + 7 * q] = 250
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="session")
def tiny_sets() -> tuple[ImageSet, ImageSet]:
    """(train, test): 20 and 8 images per class."""
    tr = tiny_images(20, seed=1)
    te = tiny_images(8, seed=2)
    return ImageSet(*tr, classes=CIFAR10_CLASSES), ImageSet(*te, classes=CIFAR10_CLASSES)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, tiny_sets) -> str:
    """A .tar.gz in the CIFAR ImageFolder layout holding `tiny_sets` as PNG files."""
    path = tmp_path_factory.mktemp("data") / "cifar10-tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, data in zip(("train", "test"), tiny_sets, strict=True):
            for i, (img, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
                raw = torchvision.io.encode_png(img).numpy().tobytes()
                info = tarfile.TarInfo(f"{split}/{CIFAR10_CLASSES[label]}/{i:04d}.png")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return str(path)


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Every test gets its own data cache and no inherited data path."""
    monkeypatch.setenv("SLIMRARTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLIMRARTS_DATA", raising=False)


def tiny_loaders(tiny_sets) -> Loaders:
    """`tiny_sets` as the library's loaders: batches of 25 (test 40), with fixed disjoint search halves."""
    train, test = tiny_sets
    idx_t, idx_v = split_halves(train.labels)
    return Loaders(train=DeviceLoader(train, 25, train=True), test=DeviceLoader(test, 40, train=False),
                   search_t=DeviceLoader(train, 25, train=True, indices=idx_t, seed=1),
                   search_v=DeviceLoader(train, 25, train=True, indices=idx_v, seed=2))


def write_tiny_recipe(tmp_path, archive) -> str:
    """A recipe file for the command line over `tiny_archive`: a few steps of every phase on tiny_preresnet."""
    text = f"""
name: tiny
data: {{root: {archive}, batch_size: 25, eval_batch_size: 40}}
model: {{name: tiny_preresnet}}
train: {{epochs: 2, optim: {{lr: 0.05}}}}
search: {{epochs: 2, optim: {{lr: 0.05}}, optim_arch: {{lr: 0.01}}}}
prune: {{scope: [internal, branch-input], ratio: 0.4}}
finetune: {{epochs: 2, optim: {{lr: 0.05}}}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def calibrated_bn(model: nn.Module, size: int, seed: int | None = 0) -> nn.Module:
    """Realistic BN statistics (a few train-mode passes) and non-trivial affine parameters, in eval mode (seeded
    first unless `seed` is None)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    return model.eval()


class TinyGrouped(nn.Module):
    """A ResNeXt-style block: 1x1 → grouped 3x3 (groups=4) → 1x1, with a residual."""

    def __init__(self, groups: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(32),
                               nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c(self.b(self.a(x))))
        return self.head(x.mean((2, 3)))


TINY_PRUNE = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal"]}}


def tiny_recipe_file(tmp_path: Path, archive: str, **extra) -> str:
    data = {"name": "tiny", "seed": 0, "device": "cpu",
            "data": {"name": "cifar10", "root": archive, "batch_size": 25, "eval_batch_size": 40},
            "model": {"name": "tiny_preresnet"},
            "train": {"epochs": 1, "optim": {"lr": 0.05}},
            "search": {"epochs": 2, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
            "prune": {"ratio": 0.4, "scope": ["internal"]},
            "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, **extra}
    """A recipe file for the command line over `archive` (tiny_preresnet, a few steps of every phase), with the
    top-level sections of `extra` replacing the defaults."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, by its path (`.w.conv1.weight`, `.alphas[0]`)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat_tensors(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flat_tensors(val, f"{prefix}[{i}]").items()}
    return {}


def torchrun_script(script: Path, *args: str, nproc: int = 2, timeout: float = 300):
    """`torchrun --standalone --nproc_per_node=nproc script args` with this checkout's slimrarts, one thread each."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
