"""Load any data set in ImageFolder layout (a folder or a .tar/.tar.gz) as square uint8 ImageSets of one size."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_image

from ..errors import InputError, InputTypeError, MissingFileError
from ._cache import cache_file, read_cache, write_cache
from ._sources import IMAGE_SUFFIXES, _is_archive, _is_image_name, scan_archive
from .cifar import default_cache_dir
from .imageset import ImageSet

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_imagefolder"]

# Per-channel mean and standard deviation of ImageNet's training pixels (in [0, 1]), the usual normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRAIN, _EVAL_SPLITS = "train", ("test", "val")  # the evaluation split: test/, or val/ when there is no test/
_CACHE_FORMAT = 1
Key = tuple[str, str, str]  # (split, class, file name)


def load_imagefolder(root: str | os.PathLike, *, resize: int, cache: bool = True) -> tuple[ImageSet, ImageSet]:
    """The (train, test) splits of an ImageFolder data set, every image resized and centre-cropped to `resize`².

    `root` is a folder holding train/<class>/<image> and test/<class>/<image> (val/<class>/<image> when there is
    no test/), a folder whose only such child is that folder, or a .tar/.tar.gz/.tgz archive of one (read without
    extracting; the splits may sit under one top folder). Images are JPEG or PNG of any size and mode (grayscale
    and alpha are made RGB); each is resized (antialiased bilinear) so its shorter side is `resize`, then its centre
    `resize` x `resize` square is kept, and the whole set is held in memory as uint8 [N, 3, resize, resize]. Classes
    are the sorted names of train/'s class folders that hold images; the test split must have the same ones.
    Decoded tensors are cached in `default_cache_dir()` keyed by the source's path, sizes and modification times
    and `resize`; `cache=False` neither reads nor writes that cache.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise InputTypeError(f"load_imagefolder: root must be a path (str or os.PathLike), got {root!r}")
    if not isinstance(resize, int) or isinstance(resize, bool) or resize < 1:
        raise InputError(f"load_imagefolder: resize must be an int >= 1, got {resize!r}")
    if not isinstance(cache, bool):
        raise InputTypeError(f"load_imagefolder: cache must be a bool, got {cache!r}")
    path = _find(Path(root).expanduser())
    if path.is_file():
        kind, listing = "archive", None
        st = path.resolve().stat()
        fingerprint = f"{st.st_size}:{st.st_mtime_ns}"
    else:
        kind, listing = "folder", _list_folder(path)
        fingerprint = _fingerprint(listing)
    key = f"format={_CACHE_FORMAT};resize={resize};{kind}:{path.resolve()}:{fingerprint}"
    file = cache_file(default_cache_dir(), f"imagefolder-{kind}", key)
    blob = read_cache(file, key) if cache else None
    if blob is None:
        entries: dict = _read_archive(path) if listing is None else listing
        blob = {"key": key, **_decode_splits(entries, resize, str(path))}
        if cache:
            write_cache(blob, file)
    classes = tuple(blob["classes"])
    where = f"{path} ({kind}; train/ and {blob['eval_split']}/; resize={resize})"
    return (ImageSet(blob["train_images"], blob["train_labels"], classes, where),
            ImageSet(blob["test_images"], blob["test_labels"], classes, where))


def _find(path: Path) -> Path:
    """`path` itself when it is an archive or an ImageFolder folder, else its only child folder that is one."""
    if not path.exists():
        raise MissingFileError(f"load_imagefolder: root {str(path)!r} does not exist")
    if path.is_file():
        if _is_archive(path.name):
            return path
        raise InputError(f"load_imagefolder: root {str(path)!r} is a file but not a .tar, .tar.gz or .tgz archive")
    if _is_split_folder(path):
        return path
    children = sorted(c for c in path.iterdir() if c.is_dir() and _is_split_folder(c))
    if len(children) == 1:
        return children[0]
    found = f"several do: {[c.name for c in children]}" if children else "nor does any folder in it"
    raise InputError(f"load_imagefolder: root {str(path)!r} has no train/ plus test/ or val/ folders, {found}; "
                     "expected one ImageFolder data set (train/<class>/<image>, test/<class>/<image>)")


def _is_split_folder(path: Path) -> bool:
    return (path / _TRAIN).is_dir() and any((path / split).is_dir() for split in _EVAL_SPLITS)


def _list_folder(path: Path) -> dict[Key, Path]:
    """The image files under train/ and the evaluation split of an ImageFolder folder, by (split, class, name)."""
    eval_split = next(split for split in _EVAL_SPLITS if (path / split).is_dir())
    files = {}
    for split in (_TRAIN, eval_split):
        for cls_dir in sorted((path / split).iterdir()):
            if cls_dir.is_dir() and not cls_dir.name.startswith("."):
                files.update({(split, cls_dir.name, f.name): f for f in sorted(cls_dir.iterdir())
                              if _is_image_name(f.name) and f.is_file()})
    return files


def _fingerprint(listing: dict[Key, Path]) -> str:
    digest = hashlib.sha256()
    for (split, cls, fname), file in sorted(listing.items()):
        st = file.stat()
        digest.update(f"{split}/{cls}/{fname}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_archive(path: Path) -> dict[Key, bytes]:
    """The raw image files under <top>/train/ and <top>/test/ or <top>/val/ of a tar archive, read in one pass."""
    images, _, _ = scan_archive(path, (_TRAIN, *_EVAL_SPLITS), who="load_imagefolder: ")
    splits = {split for split, _, _ in images}
    eval_split = next((split for split in _EVAL_SPLITS if split in splits), None)
    if _TRAIN not in splits or eval_split is None:
        raise InputError(f"load_imagefolder: archive {path} needs images under train/<class>/ and test/<class>/ "
                         f"(or val/<class>/), {'/'.join(IMAGE_SUFFIXES)}; it has them only under "
                         f"{sorted(s + '/' for s in splits)}")
    return {k: v for k, v in images.items() if k[0] in (_TRAIN, eval_split)}


def _ordered(entries: dict[Key, object], where: str) -> tuple[list[str], str, list[Key], list[Key]]:
    """Class names, the evaluation split, and the train and evaluation keys in (class, file name) order (the order
    of the samples in both the in-memory and the streaming loader)."""
    splits = {split for split, _, _ in entries}
    eval_split = next((split for split in _EVAL_SPLITS if split in splits), _EVAL_SPLITS[0])
    keys = {split: sorted(k for k in entries if k[0] == split) for split in (_TRAIN, eval_split)}
    for split, found in keys.items():
        if not found:
            raise InputError(f"load_imagefolder: {where} has no images under {split}/<class>/ "
                             f"({'/'.join(IMAGE_SUFFIXES)})")
    classes = {split: sorted({cls for _, cls, _ in found}) for split, found in keys.items()}
    if classes[_TRAIN] != classes[eval_split]:
        only_train = sorted(set(classes[_TRAIN]) - set(classes[eval_split]))
        only_eval = sorted(set(classes[eval_split]) - set(classes[_TRAIN]))
        raise InputError(f"load_imagefolder: {where}: train/ and {eval_split}/ must have the same classes (class "
                         f"folders with images); only in train/: {only_train}, only in {eval_split}/: {only_eval}")
    return classes[_TRAIN], eval_split, keys[_TRAIN], keys[eval_split]


def _decode_splits(entries: dict[Key, Path | bytes], resize: int, where: str) -> dict:
    """Class names, uint8 images [N, 3, resize, resize] and labels of both splits, in (class, file name) order."""
    class_names, eval_split, train_keys, eval_keys = _ordered(entries, where)
    classes = {_TRAIN: class_names}
    keys = {_TRAIN: train_keys, eval_split: eval_keys}
    index = {cls: i for i, cls in enumerate(classes[_TRAIN])}
    order = keys[_TRAIN] + keys[eval_split]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; nothing a user of ours can act on.
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        images = list(pool.map(lambda k: _decode(entries[k], "/".join(k), resize, where), order))
    n = len(keys[_TRAIN])
    labels = torch.tensor([index[cls] for _, cls, _ in order], dtype=torch.int64)
    return {"classes": classes[_TRAIN], "eval_split": eval_split,
            "train_images": torch.stack(images[:n]), "train_labels": labels[:n],
            "test_images": torch.stack(images[n:]), "test_labels": labels[n:]}


def _decode(item: Path | bytes, what: str, resize: int, where: str) -> torch.Tensor:
    """One image file as uint8 RGB [3, resize, resize]: shorter side resized to `resize`, then the centre square."""
    try:
        data = item.read_bytes() if isinstance(item, Path) else item
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise InputError(f"load_imagefolder: {where}: cannot read {what}: {e}") from e
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [resize, resize]).contiguous()
