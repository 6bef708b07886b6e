"""The four loaders a pruning run needs (train, test, D_t, D_v), from a data config or from plain DataLoaders."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ..engine import dist
from ..errors import InputError, InputTypeError
from .cifar import load_cifar, stats_for
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, load_imagefolder
from .imageset import ImageSet
from .loader import DeviceLoader
from .registry import get_dataset, register_dataset
from .split import limit_per_class, split_halves
from .stream import StreamLoader, decoded_bytes, default_workers, index_imagefolder, is_sharded, streamable

__all__ = ["Loaders", "as_loaders", "imagefolder_sizes", "make_loaders"]


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


def make_loaders(cfg, device: torch.device | str = "cpu", *, seed: int = 0, channels_last: bool = False,
                 shard: tuple[int, int] | None = None, per_process: bool = False, ignore_index: int = 255) -> Loaders:
    """Loaders for a `DataConfig` (subset, halves and shuffling all seeded): held on the device, or streamed from
    the image files by DataLoader workers (`cfg.loader`; `auto` streams an ImageFolder set whose decoded images
    would take more than `cfg.memory_gb`).

    `shard=(rank, world)` (default: this process's place in its process group, if any) makes every loader yield
    this process's slice of each global batch; `cfg.batch_size` and `cfg.eval_batch_size` are the global batches,
    or each process's with `per_process`. In a process group each node's local rank 0 decodes (and caches) the data
    before the other processes read it.

    `info` records the data set, its source, the split sizes, `input_size` [3, H, W] of the batches, the `loader`
    (memory or stream) and, for imagefolder, `image_size` and `resize`. `cfg.cutout` applies to the three training
    loaders, never to `test`. `ignore_index` is the mask value that is no class, for `voc` (a recipe's
    `task.ignore_index`).
    """
    load = get_dataset(cfg.name)
    if getattr(load, "makes_loaders", False):  # voc, coco (tasksets.py): read by DataLoader workers
        return load(cfg, seed=seed, shard=shard, ignore_index=ignore_index)
    if cfg.cutout and not cfg.augment:
        raise InputError(f"data.cutout={cfg.cutout} is applied only to augmented batches, but data.augment is "
                         "false; set data.cutout=0 or data.augment=true")
    if shard is None and dist.world_size() > 1:
        shard = (dist.rank(), dist.world_size())
    world = shard[1] if shard is not None else 1
    batch, eval_batch = (cfg.batch_size * world, cfg.eval_batch_size * world) if per_process else \
        (cfg.batch_size, cfg.eval_batch_size)
    if world > 1 and batch % world:
        raise InputError(f"data.batch_size={cfg.batch_size} is the global batch (dist.batch=global), split over "
                         f"{world} processes: give a multiple of {world}, or set dist.batch=process to make it each "
                         "process's batch")
    stream = _streams(cfg)
    with dist.local_main_first():  # decode (and cache) once per node
        train_set, test_set, loader_args, info = (_stream_kind if stream else load)(cfg)
    if cfg.limit_per_class is not None:
        train_set = train_set.subset(limit_per_class(train_set.labels, cfg.limit_per_class, seed=cfg.split_seed))
    if cfg.test_limit_per_class is not None:
        test_set = test_set.subset(limit_per_class(test_set.labels, cfg.test_limit_per_class))
    idx_t, idx_v = split_halves(train_set.labels, seed=cfg.split_seed)
    make = StreamLoader if stream else DeviceLoader
    common = dict(device=device, channels_last=channels_last, shard=shard, **loader_args)
    fit = dict(augment=cfg.augment, cutout=cfg.cutout, **common)
    train = make(train_set, batch, train=True, seed=seed, **fit)
    test = make(test_set, eval_batch, train=False, **common)
    half_t = make(train_set, batch, train=True, indices=idx_t, seed=seed + 1, **fit)
    half_v = make(train_set, batch, train=True, indices=idx_v, seed=seed + 2, **fit)
    info = {"dataset": cfg.name, "source": train_set.source, "train": len(train_set), "test": len(test_set),
            "search_t": len(idx_t), "search_v": len(idx_v), "input_size": list(test.sample_shape), **info,
            "loader": "stream" if stream else "memory"}
    if stream:
        info["workers"] = loader_args["workers"]
    if world > 1:
        info.update(world_size=world, global_batch_size=batch)
    return Loaders(train, test, half_t, half_v, num_classes=train_set.num_classes, info=info)


def _streams(cfg) -> bool:
    """Whether the recipe's data is streamed from its files: asked for, or (auto) an ImageFolder set whose decoded
    images would not fit in `cfg.memory_gb`."""
    if cfg.loader == "memory" or cfg.name != "imagefolder":
        if cfg.loader == "stream":
            raise InputError(f"data.loader=stream reads image files; data.name={cfg.name} is held in memory (set "
                             "data.loader to auto or memory)")
        return False
    if cfg.root is None:
        return False  # the imagefolder kind names what is missing
    if cfg.loader == "stream":
        if not streamable(cfg.root):
            raise InputError(f"data.loader=stream: {cfg.root!r} cannot be streamed: give an ImageFolder folder, an "
                             "uncompressed .tar of one, or a folder of .tar shards (a .tar.gz has no random access: "
                             "decompress or extract it)")
        return True
    if not streamable(cfg.root):
        return False  # e.g. a .tar.gz: only the in-memory path reads it
    if is_sharded(cfg.root):
        return True  # only the streaming path reads tar shards
    _, resize = imagefolder_sizes(cfg.image_size, cfg.resize)
    train, test = index_imagefolder(cfg.root)
    return decoded_bytes(len(train) + len(test), resize) > cfg.memory_gb * 1e9


@register_dataset("cifar10", "cifar100")
def _cifar(cfg) -> tuple[ImageSet, ImageSet, dict, dict]:
    for key in ("image_size", "resize"):
        if getattr(cfg, key, None) is not None:
            raise InputError(f"data.{key}={getattr(cfg, key)!r} is used only by data.name=imagefolder (CIFAR stays "
                             "32x32); set it to None")
    train_set, test_set = load_cifar(cfg.name, cfg.root, download=cfg.download)
    mean, std = stats_for(cfg.name)
    return train_set, test_set, {"mean": mean, "std": std}, {}


@register_dataset("imagefolder")
def _imagefolder(cfg) -> tuple[ImageSet, ImageSet, dict, dict]:
    if cfg.root is None:
        raise InputError("data.root is None, but data.name=imagefolder needs one: a folder or .tar/.tar.gz with "
                         "train/<class>/... and test/<class>/... (or val/<class>/...)")
    image_size, resize = imagefolder_sizes(cfg.image_size, cfg.resize)
    train_set, test_set = load_imagefolder(cfg.root, resize=resize)
    args = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop": "rrc", "image_size": image_size,
            "crop_scale": _crop_scale(cfg)}
    return train_set, test_set, args, {"image_size": image_size, "resize": resize}


def _stream_kind(cfg) -> tuple:
    """The image files of an ImageFolder set and the StreamLoader arguments (images decoded by workers)."""
    image_size, resize = imagefolder_sizes(cfg.image_size, cfg.resize)
    train_files, test_files = index_imagefolder(cfg.root)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    args = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop": "rrc", "image_size": image_size,
            "crop_scale": _crop_scale(cfg), "resize": resize, "workers": workers}
    return train_files, test_files, args, {"image_size": image_size, "resize": resize}


def _crop_scale(cfg) -> tuple[float, float] | None:
    return None if cfg.crop_scale is None else tuple(cfg.crop_scale)  # None: the loader's default, (0.08, 1)


def imagefolder_sizes(image_size: int | None, resize: int | None) -> tuple[int, int]:
    """(image_size, resize) with the ImageNet ratio 224:256 filling in what is None (224 and 256 when both are)."""
    for what, value in (("image_size", image_size), ("resize", resize)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"data.{what} must be an int >= 1 or None, got {value!r}")
    if image_size is None:
        image_size = 224 if resize is None else round(resize * 224 / 256)
    if resize is None:
        resize = round(image_size * 256 / 224)
    if resize < image_size:
        raise InputError(f"data.resize={resize} must be >= data.image_size={image_size}: images are stored at "
                         "resize x resize and evaluated on their centre image_size crop")
    return image_size, resize


def _labels_of(dataset) -> torch.Tensor | None:
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return torch.as_tensor(value)
    return None


_PASS_HALVES = ("pass search_t and search_v loaders yourself (each over one half of the training set, sampled as you "
                "like)")


def _user_sampling(loader: DataLoader) -> tuple[torch.Tensor | None, WeightedRandomSampler | None]:
    """What the user's training loader draws: the sample indices (None: all of them) and a weighted sampler whose
    weights the halves keep (None: uniform). A sampling the halves cannot keep is refused, saying what to pass."""
    if loader.batch_size is None:
        how = (f"has a batch_sampler ({type(loader.batch_sampler).__name__})" if loader.batch_sampler is not None
               else "is unbatched (batch_size=None)")
        raise InputError(f"the train loader {how}: slimrarts cannot split its batches into the search halves "
                         f"D_t / D_v; {_PASS_HALVES}, or give the DataLoader batch_size= (and sampler=) instead")
    s = loader.sampler
    if isinstance(s, DistributedSampler) and dist.world_size() == 1 and s.num_replicas > 1:
        raise InputError(f"the train loader's DistributedSampler takes shard {s.rank} of {s.num_replicas}, but this is "
                         "one process: the search halves would cover every shard. Drop the sampler (use "
                         f"shuffle=True), or run under torchrun with {s.num_replicas} processes")
    if isinstance(s, RandomSampler) and dist.world_size() == 1 and (s.replacement or s._num_samples is not None):
        # drawn uniformly, but with replacement or another number of draws per epoch: the halves keep both
        uniform = WeightedRandomSampler(torch.ones(len(loader.dataset), dtype=torch.double), s.num_samples,
                                        replacement=s.replacement)
        return None, uniform
    if isinstance(s, (RandomSampler, SequentialSampler, DistributedSampler)):
        return None, None
    if dist.world_size() == 1 and isinstance(s, SubsetRandomSampler):
        return torch.as_tensor(list(s.indices), dtype=torch.int64), None
    if dist.world_size() == 1 and isinstance(s, WeightedRandomSampler):
        return None, s
    raise InputError(f"the train loader's sampler is a {type(s).__name__}, which slimrarts cannot carry into the "
                     f"search halves D_t / D_v{' in a process group' if dist.world_size() > 1 else ''}; "
                     f"{_PASS_HALVES}, or use shuffle=True, a SubsetRandomSampler or a WeightedRandomSampler")


def _halve(loader: DataLoader, seed: int) -> tuple[DataLoader, DataLoader]:
    """The two search halves of the user's training loader, drawn as it draws: over its sampler's subset, with its
    sampler's weights; each with the loader's batch size, workers, collate function and drop_last."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise InputError(f"the train loader's dataset is an IterableDataset ({type(dataset).__name__}): slimrarts "
                         f"splits the training set into the search halves D_t / D_v by index; {_PASS_HALVES}, or "
                         "use a map-style Dataset")
    pool, weighted = _user_sampling(loader)
    n = len(dataset) if pool is None else len(pool)
    if n < 4:
        raise InputError(f"the training set has {n} sample(s); the search splits it into two halves and "
                         "each needs at least 2 (batch norm needs 2 per batch): give at least 4 training samples")
    labels = _labels_of(dataset)
    if labels is not None and len(labels) == len(dataset):
        idx_t, idx_v = split_halves(labels if pool is None else labels[pool], seed=seed)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        idx_t, idx_v = order[: (n + 1) // 2].sort().values, order[(n + 1) // 2:].sort().values
    if pool is not None:
        idx_t, idx_v = pool[idx_t], pool[idx_v]
    out = []
    for k, idx in enumerate((idx_t, idx_v)):
        half = Subset(dataset, idx.tolist())
        if weighted is not None:  # the user's weights, restricted to the half; as many draws as its share
            weights = torch.as_tensor(weighted.weights, dtype=torch.double)[idx]
            draws = max(1, round(weighted.num_samples * len(idx) / len(dataset)))
            if not weighted.replacement:
                draws = min(draws, int((weights > 0).sum()))
            sampler = WeightedRandomSampler(weights, draws, replacement=weighted.replacement,
                                            generator=torch.Generator().manual_seed(seed + k))
            out.append(DataLoader(half, batch_size=loader.batch_size, sampler=sampler,
                                  num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                  pin_memory=loader.pin_memory, drop_last=loader.drop_last))
            continue
        if dist.world_size() > 1:  # each process its share, reshuffled per epoch (set_epoch) from the seed
            sampler = DistributedSampler(half, shuffle=True, seed=seed, drop_last=loader.drop_last)
            out.append(DataLoader(half, batch_size=loader.batch_size, sampler=sampler,
                                  num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                  pin_memory=loader.pin_memory, drop_last=loader.drop_last))
            continue
        out.append(DataLoader(half, batch_size=loader.batch_size, shuffle=True,
                              num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                              pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                              generator=torch.Generator().manual_seed(seed)))
    return out[0], out[1]


def _warn_unsharded(train) -> None:
    """A user's training DataLoader in a process group without a DistributedSampler trains every process on the
    same batches: correct (the averaged gradient is the same), but no faster than one process."""
    sampler = getattr(train, "sampler", None)
    if dist.world_size() > 1 and isinstance(train, DataLoader) and not isinstance(sampler, DistributedSampler):
        warnings.warn(f"the training DataLoader has no DistributedSampler, so each of the {dist.world_size()} "
                      "processes trains on the same batches; give it sampler=DistributedSampler(dataset) (batch_size "
                      "is then per process) to split the data", RuntimeWarning, stacklevel=3)


def as_loaders(loaders: Any, *, seed: int = 0) -> Loaders:
    """Accept a `Loaders`, a `(train, test)` pair or a dict with `train`/`test` (and optionally `search_t`/`search_v`).

    Without given halves, the training DataLoader's dataset is split into two disjoint halves (stratified when the
    dataset has `targets`), each served by a DataLoader with the same batch size, workers and collate function.

    In a process group, user DataLoaders are used as given (batches per process: shard them with a
    `DistributedSampler`); the halves made here get one, each process its share.
    """
    if isinstance(loaders, Loaders):
        return loaders
    if isinstance(loaders, dict):
        missing = [k for k in ("train", "test") if k not in loaders]
        if missing:
            raise InputError(f"loaders dict is missing {missing}; give at least 'train' and 'test'")
        train, test = loaders["train"], loaders["test"]
        half_t, half_v = loaders.get("search_t"), loaders.get("search_v")
    elif isinstance(loaders, (tuple, list)) and len(loaders) == 2:
        train, test = loaders
        half_t = half_v = None
    else:
        raise InputTypeError("loaders must be slimrarts.data.Loaders, a (train, test) pair of loaders, or a dict with "
                             f"'train' and 'test'; got {type(loaders).__name__}")
    if (half_t is None) != (half_v is None):
        raise InputError("give both search_t and search_v, or neither")
    if half_t is not None and half_t is half_v:
        warnings.warn("search_t and search_v are the same loader: RARTS' weights and α are meant to learn on two "
                      "disjoint halves of the training set (D_t, D_v); give two loaders over disjoint halves, or "
                      "neither (slimrarts then splits the training set)", RuntimeWarning, stacklevel=2)
    _warn_unsharded(train)
    if half_t is None:
        if not isinstance(train, DataLoader):
            raise InputTypeError("to split the training set into D_t/D_v, the train loader must be a "
                                 f"torch.utils.data.DataLoader (got {type(train).__name__}); or pass search_t/search_v")
        half_t, half_v = _halve(train, seed)
    num_classes = getattr(train, "num_classes", None)
    return Loaders(train, test, half_t, half_v, num_classes=num_classes)
