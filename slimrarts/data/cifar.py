"""Load CIFAR-10/100 from a local folder or archive, the cache or a download, as uint8 ImageSets."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import InputError, InputTypeError, MissingFileError
from ._cache import cache_file, read_cache, write_cache
from ._sources import PICKLE_DIRS, Decoded, Source, find_source, read_source, source_key
from .imageset import ImageSet

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DATA_ENV", "CACHE_ENV",
    "default_cache_dir", "load_cifar", "stats_for",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the training images' pixels (over all pixels, in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
DATA_ENV = "SLIMRARTS_DATA"
CACHE_ENV = "SLIMRARTS_CACHE"

_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_CACHE_FORMAT = 1


def stats_for(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per channel of data set `name` ("cifar10" or "cifar100"), for normalising [0, 1] pixels."""
    return _STATS[_check_name(name)]


def default_cache_dir() -> Path:
    """The folder for downloads and decoded-image caches: $SLIMRARTS_CACHE, else $XDG_CACHE_HOME/slimrarts/data,
    else ~/.cache/slimrarts/data."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "slimrarts" / "data"


def load_cifar(name: str = "cifar10", root: str | os.PathLike | None = None, *, download: bool = True,
               cache: bool = True) -> tuple[ImageSet, ImageSet]:
    """The (train, test) splits of CIFAR-10 or CIFAR-100.

    `root` is a source or a folder holding one: a torchvision folder (cifar-10-batches-py, cifar-100-python),
    an ImageFolder folder (train/<class>/*.jpg|png and test/<class>/...) or a .tar/.tar.gz/.tgz archive of either,
    read without extracting. Inside a folder, a source is picked by name (torchvision folder, then train/+test/
    folder, then archive, each by sorted name). An explicit `root` is the only place looked at. With `root=None`
    the places tried are $SLIMRARTS_DATA, then the cache folder (`default_cache_dir()`), then a torchvision
    download into the cache folder when `download`. Images decoded from JPEG/PNG files are cached there as tensors
    keyed by the source's path, sizes and modification times; `cache=False` neither reads nor writes that cache.
    Raises FileNotFoundError naming every place tried when none holds the data set.
    """
    name = _check_name(name)
    for flag, value in (("download", download), ("cache", cache)):
        if not isinstance(value, bool):
            raise InputTypeError(f"load_cifar: {flag} must be a bool, got {value!r}")
    cache_dir = default_cache_dir()
    source = _resolve(name, root, download, cache_dir)
    classes, (train_x, train_y), (test_x, test_y) = _read_cached(source, name, cache_dir if cache else None)
    _check_classes(name, classes, source)
    where = str(source)
    return ImageSet(train_x, train_y, classes, where), ImageSet(test_x, test_y, classes, where)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _STATS:
        raise InputError(f"data set name must be one of {sorted(_STATS)}, got {name!r}")
    return name.lower()


def _resolve(name: str, root: str | os.PathLike | None, download: bool, cache_dir: Path) -> Source:
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise InputTypeError(f"load_cifar: root must be a path (str or os.PathLike) or None, got {root!r}")
        try:
            return find_source(Path(root).expanduser(), name)
        except FileNotFoundError as e:
            raise MissingFileError(
                f"{_TITLES[name]} ({name!r}) not found at root={os.fspath(root)!r}: {e}. An explicit root is the "
                f"only place looked at; pass a folder or archive that holds the data set, or root=None to try "
                f"${DATA_ENV}, the cache folder and a download.") from None
    tried = []
    env = os.environ.get(DATA_ENV)
    places = [(f"${DATA_ENV}={env!r}", Path(env).expanduser())] if env else []
    if not env:
        tried.append(f"${DATA_ENV}: not set")
    places.append((f"the cache folder {cache_dir}", cache_dir))
    for label, path in places:
        try:
            source = find_source(path, name)
        except FileNotFoundError as e:
            tried.append(f"{label}: {e}")
            continue
        if env and path != places[0][1]:
            warnings.warn(f"${DATA_ENV} is set but unusable ({tried[0]}); using {source}", stacklevel=3)
        return source
    if download:
        try:
            source = _download(name, cache_dir)
            if env:
                warnings.warn(f"${DATA_ENV} is set but unusable ({tried[0]}); downloaded {source}", stacklevel=3)
            return source
        except Exception as e:  # noqa: BLE001 - any failure (no network, no disk) is reported with the others
            tried.append(f"download into {cache_dir}: failed ({type(e).__name__}: {e})")
    else:
        tried.append(f"download into {cache_dir}: skipped (download=False)")
    lines = "\n".join(f"  - {t}" for t in tried)
    raise MissingFileError(
        f"{_TITLES[name]} ({name!r}) not found. Places tried:\n{lines}\nTo fix: pass root= a torchvision folder "
        f"({PICKLE_DIRS[name]}), a train/+test/ image folder or a .tar/.tar.gz/.tgz archive of one (or a folder "
        f"holding one), or set ${DATA_ENV} to such a path, or allow download=True on a machine with internet.")


def _download(name: str, cache_dir: Path) -> Source:
    import torchvision.datasets as tvd

    dataset = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset(str(cache_dir), train=True, download=True)
    return Source("pickle", cache_dir / PICKLE_DIRS[name])


def _read_cached(source: Source, name: str, cache_dir: Path | None) -> Decoded:
    if source.kind == "pickle" or cache_dir is None:  # pickles hold raw pixels already: nothing to gain
        return read_source(source, name)
    key = f"format={_CACHE_FORMAT};name={name};{source_key(source)}"
    file = cache_file(cache_dir, f"{name}-{source.kind}", key)
    blob = read_cache(file, key)
    if blob is not None:
        return (tuple(blob["classes"]), (blob["train_images"], blob["train_labels"]),
                (blob["test_images"], blob["test_labels"]))
    decoded = read_source(source, name)
    classes, (train_x, train_y), (test_x, test_y) = decoded
    blob = {"key": key, "classes": list(classes), "train_images": train_x, "train_labels": train_y,
            "test_images": test_x, "test_labels": test_y}
    write_cache(blob, file)
    return decoded


def _check_classes(name: str, classes: tuple[str, ...], source: Source) -> None:
    expected = _NUM_CLASSES[name]
    if len(classes) != expected:
        raise InputError(f"{source} has {len(classes)} classes, {_TITLES[name]} has {expected}: "
                         f"{list(classes)[:12]}{'...' if len(classes) > 12 else ''}")
    if name == "cifar10" and source.kind != "pickle" and classes != CIFAR10_CLASSES:
        raise InputError(f"{source} has classes {list(classes)}, expected the CIFAR-10 classes "
                         f"{list(CIFAR10_CLASSES)} (as folder names, so that sorted order gives the standard labels)")
