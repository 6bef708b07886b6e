"""The four loaders a pruning run needs (train, test, D_t, D_v), from a data config or from plain DataLoaders."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Subset

from .cifar import load_cifar, stats_for
from .loader import DeviceLoader
from .split import limit_per_class, split_halves

__all__ = ["Loaders", "make_loaders", "as_loaders"]


@dataclasses.dataclass
class Loaders:
    """`train`: the whole training set (fine-tuning, joint search); `search_t`/`search_v`: its two disjoint halves
    D_t and D_v; `test`: the test set, used only to report."""

    train: Iterable
    test: Iterable
    search_t: Iterable
    search_v: Iterable
    num_classes: int | None = None
    info: dict = dataclasses.field(default_factory=dict)


def make_loaders(cfg, device: torch.device | str = "cpu", *, seed: int = 0, channels_last: bool = False) -> Loaders:
    """Device-resident CIFAR loaders for a `DataConfig` (subset, halves and shuffling all seeded)."""
    train_set, test_set = load_cifar(cfg.name, cfg.root, download=cfg.download)
    if cfg.limit_per_class is not None:
        train_set = train_set.subset(limit_per_class(train_set.labels, cfg.limit_per_class, seed=cfg.split_seed))
    if cfg.test_limit_per_class is not None:
        test_set = test_set.subset(limit_per_class(test_set.labels, cfg.test_limit_per_class))
    idx_t, idx_v = split_halves(train_set.labels, seed=cfg.split_seed)
    mean, std = stats_for(cfg.name)
    common = dict(device=device, mean=mean, std=std, channels_last=channels_last)
    train = DeviceLoader(train_set, cfg.batch_size, train=True, augment=cfg.augment, seed=seed, **common)
    test = DeviceLoader(test_set, cfg.eval_batch_size, train=False, **common)
    half_t = DeviceLoader(train_set, cfg.batch_size, train=True, indices=idx_t, augment=cfg.augment, seed=seed + 1,
                          **common)
    half_v = DeviceLoader(train_set, cfg.batch_size, train=True, indices=idx_v, augment=cfg.augment, seed=seed + 2,
                          **common)
    info = {"dataset": cfg.name, "source": train_set.source, "train": len(train_set), "test": len(test_set),
            "search_t": len(idx_t), "search_v": len(idx_v)}
    return Loaders(train, test, half_t, half_v, num_classes=train_set.num_classes, info=info)


def _labels_of(dataset) -> torch.Tensor | None:
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return torch.as_tensor(value)
    return None


def _halve(loader: DataLoader, seed: int) -> tuple[DataLoader, DataLoader]:
    dataset = loader.dataset
    labels = _labels_of(dataset)
    if labels is not None and len(labels) == len(dataset):
        idx_t, idx_v = split_halves(labels, seed=seed)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        idx_t, idx_v = order[: (len(order) + 1) // 2].sort().values, order[(len(order) + 1) // 2:].sort().values
    out = []
    for idx in (idx_t, idx_v):
        out.append(DataLoader(Subset(dataset, idx.tolist()), batch_size=loader.batch_size, shuffle=True,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                              generator=torch.Generator().manual_seed(seed)))
    return out[0], out[1]


def as_loaders(loaders: Any, *, seed: int = 0) -> Loaders:
    """Accept a `Loaders`, a `(train, test)` pair or a dict with `train`/`test` (and optionally `search_t`/`search_v`).

    Without given halves, the training DataLoader's dataset is split into two disjoint halves (stratified when the
    dataset has `targets`), each served by a DataLoader with the same batch size, workers and collate function.
    """
    if isinstance(loaders, Loaders):
        return loaders
    if isinstance(loaders, dict):
        missing = [k for k in ("train", "test") if k not in loaders]
        if missing:
            raise ValueError(f"loaders dict is missing {missing}; give at least 'train' and 'test'")
        train, test = loaders["train"], loaders["test"]
        half_t, half_v = loaders.get("search_t"), loaders.get("search_v")
    elif isinstance(loaders, (tuple, list)) and len(loaders) == 2:
        train, test = loaders
        half_t = half_v = None
    else:
        raise TypeError("loaders must be slimrarts.data.Loaders, a (train, test) pair of loaders, or a dict with "
                        f"'train' and 'test'; got {type(loaders).__name__}")
    if (half_t is None) != (half_v is None):
        raise ValueError("give both search_t and search_v, or neither")
    if half_t is None:
        if not isinstance(train, DataLoader):
            raise TypeError("to split the training set into D_t/D_v, the train loader must be a "
                            f"torch.utils.data.DataLoader (got {type(train).__name__}); or pass search_t/search_v")
        half_t, half_v = _halve(train, seed)
    num_classes = getattr(train, "num_classes", None)
    return Loaders(train, test, half_t, half_v, num_classes=num_classes)
