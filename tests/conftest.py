"""Shared tiny data: a learnable 10-class image set, as an ImageSet and as an ImageFolder-layout archive."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision

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
