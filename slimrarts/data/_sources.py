"""Find and read CIFAR-style sources: torchvision pickle folders, ImageFolder folders and tar archives."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from ..errors import InputError, MissingFileError

__all__ = ["PICKLE_DIRS", "Source", "find_source", "read_source", "source_key"]

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PICKLE_FILES = {
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",),
                "meta": "batches.meta"},
    "cifar100": {"train": ("train",), "test": ("test",), "meta": "meta"},
}
_PICKLE_KEYS = {"cifar10": ("labels", "label_names"), "cifar100": ("fine_labels", "fine_label_names")}
# The only globals a CIFAR pickle needs (numpy arrays, in the names numpy 1 and 2 write); anything else is refused.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})

Split = tuple[torch.Tensor, torch.Tensor]
Decoded = tuple[tuple[str, ...], Split, Split]


@dataclass(frozen=True)
class Source:
    """A place that holds a data set: `kind` is "pickle" (torchvision folder), "folder" or "archive"."""

    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


def find_source(path: Path, name: str) -> Source:
    """The source for data set `name` at `path` (the source itself, or a folder holding it).

    Raises FileNotFoundError with the reason when there is none.
    """
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_file():
        if _is_archive(path.name):
            return Source("archive", path)
        raise MissingFileError(f"{path} is a file but not a .tar, .tar.gz or .tgz archive")
    found = _pickle_kind(path)
    if found is not None:
        if found != name:
            raise MissingFileError(f"{path} is a torchvision {found} folder, not {name}")
        return Source("pickle", path)
    if _is_image_folder(path):
        return Source("folder", path)
    if _pickle_kind(path / PICKLE_DIRS[name]) == name:
        return Source("pickle", path / PICKLE_DIRS[name])
    try:
        children = sorted(c for c in path.iterdir() if _name_matches(c.name, name))
    except OSError as e:
        raise MissingFileError(f"{path} cannot be listed: {e}") from e
    for child in children:
        if child.is_dir() and _is_image_folder(child):
            return Source("folder", child)
    for child in children:
        if child.is_file() and _is_archive(child.name):
            return Source("archive", child)
    raise MissingFileError(
        f"{path} holds no {name} data: it is not a torchvision or train/+test/ folder itself, and has no "
        f"{PICKLE_DIRS[name]}/ folder, no train/+test/ folder or .tar/.tar.gz/.tgz archive named like {name!r}")


def source_key(source: Source) -> str:
    """A string that changes when the source's content (by path, sizes and modification times) changes."""
    path = source.path.resolve()
    if source.kind == "folder":
        digest = hashlib.sha256()
        for split, cls, fname, file in _folder_files(path):
            st = file.stat()
            digest.update(f"{split}/{cls}/{fname}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return f"{source.kind}:{path}:{digest.hexdigest()}"
    st = path.stat()
    return f"{source.kind}:{path}:{st.st_size}:{st.st_mtime_ns}"


def read_source(source: Source, name: str) -> Decoded:
    """Class names and decoded (uint8 images [N, 3, H, W], int64 labels) of the train and test splits."""
    return _READERS[source.kind](source.path, name)


def _read_pickle_folder(path: Path, name: str) -> Decoded:
    def load(fname: str) -> dict:
        file = path / fname
        if not file.is_file():
            raise InputError(f"torchvision {name} folder {path} lacks the file {fname!r}")
        with open(file, "rb") as f:
            return _unpickle(f, str(file))

    return _from_pickles(load, name)


def _read_folder(path: Path, name: str) -> Decoded:
    entries = {(split, cls, fname): file.read_bytes() for split, cls, fname, file in _folder_files(path)}
    return _from_images(entries, str(path))


def scan_archive(path: Path, splits: tuple[str, ...], *, pickle_dir: str | None = None, wanted: set[str] = frozenset(),
                 who: str = "") -> tuple[dict[tuple[str, str, str], bytes], dict[str, bytes], set[str]]:
    """Read a tar archive in one pass: the images under <root>/<split>/<class>/ (one root), the `wanted` files of
    `pickle_dir`, and the names at its top level; an unreadable archive or several roots are a ValueError."""
    images: dict[tuple[str, str, str], bytes] = {}
    pickles: dict[str, bytes] = {}
    roots: set[tuple[str, ...]] = set()
    tops: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts
                tops.add(parts[0])
                if pickle_dir is not None and len(parts) >= 2 and parts[-2] == pickle_dir and parts[-1] in wanted:
                    pickles[parts[-1]] = _read_member(tar, member)
                elif len(parts) >= 3 and parts[-3] in splits and _is_image_name(parts[-1]):
                    roots.add(parts[:-3])
                    images[parts[-3:]] = _read_member(tar, member)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise InputError(f"{who}cannot read the archive {path}: {e}") from e
    if len(roots) > 1:
        listed = ", ".join(repr("/".join(r) + "/") for r in sorted(roots))
        raise InputError(f"{who}archive {path} holds split folders ({', '.join(splits)}) under several folders "
                         f"({listed}); expected one")
    return images, pickles, tops


def _read_archive(path: Path, name: str) -> Decoded:
    wanted = {*_PICKLE_FILES[name]["train"], *_PICKLE_FILES[name]["test"], _PICKLE_FILES[name]["meta"]}
    images, pickles, tops = scan_archive(path, SPLITS, pickle_dir=PICKLE_DIRS[name], wanted=wanted)
    if images:
        return _from_images(images, str(path))
    if pickles:
        def load(fname: str) -> dict:
            if fname not in pickles:
                raise InputError(f"archive {path} lacks {PICKLE_DIRS[name]}/{fname}")
            return _unpickle(io.BytesIO(pickles[fname]), f"{path}:{fname}")

        return _from_pickles(load, name)
    raise InputError(f"archive {path} holds neither train/<class>/<image> and test/<class>/<image> members "
                     f"({'/'.join(IMAGE_SUFFIXES)}) nor a {PICKLE_DIRS[name]}/ folder; its top level holds "
                     f"{sorted(tops)[:5]}")


_READERS: dict[str, Callable[[Path, str], Decoded]] = {
    "pickle": _read_pickle_folder, "folder": _read_folder, "archive": _read_archive}


def _from_pickles(load: Callable[[str], dict], name: str) -> Decoded:
    files = _PICKLE_FILES[name]
    label_key, names_key = _PICKLE_KEYS[name]
    meta = load(files["meta"])
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in _get(meta, names_key, files["meta"]))
    splits = []
    for split in SPLITS:
        images, labels = [], []
        for fname in files[split]:
            batch = load(fname)
            data = np.asarray(_get(batch, "data", fname))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise InputError(f"{fname}: 'data' must be a uint8 array [N, 3072], got {data.dtype} {data.shape}")
            images.append(torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(np.asarray(_get(batch, label_key, fname), dtype=np.int64)))
            if len(labels[-1]) != len(images[-1]):
                raise InputError(f"{fname}: {len(images[-1])} images but {len(labels[-1])} labels")
        splits.append((torch.cat(images), torch.cat(labels)))
    return classes, splits[0], splits[1]


def _from_images(entries: dict[tuple[str, str, str], bytes], where: str) -> Decoded:
    by_split = {split: sorted(k for k in entries if k[0] == split) for split in SPLITS}
    classes = {split: sorted({cls for _, cls, _ in keys}) for split, keys in by_split.items()}
    for split in SPLITS:
        if not by_split[split]:
            raise InputError(f"{where} has no images under {split}/<class>/ ({'/'.join(IMAGE_SUFFIXES)})")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise InputError(f"{where}: train/ and test/ have different classes (only in train: {only_train}, "
                         f"only in test: {only_test})")
    index = {cls: i for i, cls in enumerate(classes["train"])}
    splits = []
    for split in SPLITS:
        keys = by_split[split]
        images = _decode_all([("/".join(k), entries[k]) for k in keys], where)
        splits.append((images, torch.tensor([index[cls] for _, cls, _ in keys], dtype=torch.int64)))
    return tuple(classes["train"]), splits[0], splits[1]


def _decode_all(items: list[tuple[str, bytes]], where: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; nothing a user of ours can act on.
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        return _decode_loop(items, where)


def _decode_loop(items: list[tuple[str, bytes]], where: str) -> torch.Tensor:
    out = torch.empty(0, dtype=torch.uint8)
    for i, (what, data) in enumerate(items):
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"{where}: cannot decode {what}: {e}") from e
        if i == 0:
            out = torch.empty((len(items), *image.shape), dtype=torch.uint8)
        elif image.shape != out.shape[1:]:
            raise InputError(f"{where}: {what} is {image.shape[2]}x{image.shape[1]} pixels, the first image "
                             f"{items[0][0]} is {out.shape[3]}x{out.shape[2]}; all must be the same size")
        out[i] = image
    return out


def _folder_files(path: Path) -> list[tuple[str, str, str, Path]]:
    files = []
    for split in SPLITS:
        for cls_dir in sorted((path / split).iterdir()):
            if cls_dir.is_dir() and not cls_dir.name.startswith("."):
                files += [(split, cls_dir.name, f.name, f) for f in sorted(cls_dir.iterdir())
                          if _is_image_name(f.name) and f.is_file()]
    return files


def _unpickle(fileobj: io.BufferedIOBase, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(fileobj, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as e:
        raise InputError(f"cannot read the CIFAR pickle {where}: {e}") from e
    if not isinstance(obj, dict):
        raise InputError(f"the CIFAR pickle {where} holds a {type(obj).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR pickle holds only numpy "
                                         "arrays, lists, numbers and strings")
        return super().find_class(module, name)


def _get(d: dict, key: str, where: str) -> object:
    if key not in d:
        raise InputError(f"{where} lacks the key {key!r} (it has {sorted(map(str, d))})")
    return d[key]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # regular files always have a file object
    return f.read()


def _pickle_kind(path: Path) -> str | None:
    if (path / "batches.meta").is_file() and (path / "data_batch_1").is_file():
        return "cifar10"
    if (path / "meta").is_file() and (path / "train").is_file() and (path / "test").is_file():
        return "cifar100"
    return None


def _is_image_folder(path: Path) -> bool:
    return all((path / split).is_dir() for split in SPLITS)


def _is_image_name(fname: str) -> bool:
    return not fname.startswith(".") and fname.lower().endswith(IMAGE_SUFFIXES)


def _is_archive(fname: str) -> bool:
    return fname.lower().endswith(ARCHIVE_SUFFIXES)


def _name_matches(fname: str, name: str) -> bool:
    """Whether a file or folder name names data set `name` ("cifar-10-x" names cifar10, "cifar100" does not)."""
    return re.search(re.escape(name) + r"(?!\d)", re.sub(r"[^a-z0-9]", "", fname.lower())) is not None
