"""The data sets a recipe can name as `data.name`: one registry, from which the recipe's allowed values come.

A data set is a function `load(cfg) -> (train, test, loader_args, info)`: `cfg` is the recipe's `data` section,
`train` and `test` are `ImageSet`s, `loader_args` are `DeviceLoader` keywords (`mean`, `std`, `crop`, ...) and
`info` extra entries for `Loaders.info`. Register one with `@register_dataset("name")`; `slimrarts.data` registers
cifar10, cifar100 and imagefolder, and voc and coco (`tasksets.py`), whose functions carry `makes_loaders = True`
and return the whole `Loaders` from `load(cfg, seed=..., shard=..., ignore_index=...)` (DataLoader workers read
them; `ignore_index` is the recipe's `task.ignore_index`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from ..errors import InputError

__all__ = ["describe_datasets", "get_dataset", "list_datasets", "register_dataset"]

Dataset = Callable[[Any], tuple[Any, Any, dict, dict]]
_REGISTRY: dict[str, Dataset] = {}


def register_dataset(*names: str) -> Callable[[Dataset], Dataset]:
    """Decorator registering `load(cfg)` under each of `names` (one function may read several, e.g. CIFAR-10/100)."""
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"register_dataset needs one or more non-empty names, got {names!r}")

    def add(fn: Dataset) -> Dataset:
        taken = [n for n in names if n in _REGISTRY]
        if taken:
            raise InputError(f"data set {taken[0]!r} is already registered")
        _REGISTRY.update(dict.fromkeys(names, fn))
        return fn

    return add


def get_dataset(name: str) -> Dataset:
    """The loader of data set `name`; an unknown name lists the registered ones."""
    fn = _REGISTRY.get(name)
    if fn is None:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"data.name {name!r} is unknown{hint}; choose one of {describe_datasets()}")
    return fn


def list_datasets() -> list[str]:
    """Registered data set names, in registration order."""
    return list(_REGISTRY)


def describe_datasets() -> str:
    return ", ".join(_REGISTRY)
