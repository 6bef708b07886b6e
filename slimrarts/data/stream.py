"""Data that does not fit in memory: an ImageFolder set read from its files every epoch by DataLoader workers.

`index_imagefolder(root)` lists the images of a folder, an uncompressed `.tar`, or a folder of `.tar` shards in
ImageFolder layout (train/<class>/<image>, test/ or val/) without decoding anything: paths, or (archive, offset,
size) of tar members, read at random. `StreamLoader` serves them like `DeviceLoader` does a decoded set: the
epoch's order and augmentation draws come from (seed, epoch) for the whole set, each process takes its slice of
every global batch, and the same samples in the same order make the same batches, bitwise, on the CPU. The work is
split where it is cheapest: a standard `torch.utils.data.DataLoader` with worker processes reads and decodes each
image, resizes it to `resize` and crops its centre (the per-image CPU work; an evaluation crop too), and the batch
then gets its random-resized crop, flip, normalisation and cutout on the device, as in the in-memory path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

from ..engine import dist
from ..errors import InputError, InputTypeError
from ._sources import _is_image_name
from .imagefolder import _EVAL_SPLITS, _TRAIN, _decode, _find, _list_folder, _ordered
from .imageset import _as_index
from .loader import _Batcher

__all__ = ["ImageFiles", "StreamLoader", "decoded_bytes", "default_workers", "index_imagefolder", "is_sharded",
           "streamable"]

Member = tuple[str, int, int]  # (archive path, data offset, size) of one tar member


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFiles:
    """The image files of one split, in the order the in-memory loader holds them: where each is (a path or a tar
    member), its label, the class names and a description of the source."""

    items: tuple[Path | Member, ...]
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFiles:
        """The files at `indices` (as `ImageSet.subset`)."""
        idx = _as_index(indices, len(self), "indices")
        return ImageFiles(tuple(self.items[i] for i in idx.tolist()), self.labels.index_select(0, idx), self.classes,
                          self.source)

    def read(self, i: int) -> bytes:
        item = self.items[i]
        if isinstance(item, Path):
            return item.read_bytes()
        path, offset, size = item
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)


def decoded_bytes(n: int, resize: int) -> int:
    """Bytes `n` images take decoded at `resize` x `resize` (uint8 RGB), as the in-memory loader holds them."""
    return n * 3 * resize * resize


def _tar_members(paths: Sequence[Path], who: str) -> dict[tuple[str, str, str], Member]:
    """(split, class, name) -> (archive, offset, size) of the images under <root>/<split>/<class>/ of the archives."""
    out: dict[tuple[str, str, str], Member] = {}
    roots: set[tuple[str, ...]] = set()
    for path in paths:
        try:
            with tarfile.open(path, "r:") as tar:  # not "r:*": a compressed archive has no random access
                for member in tar:
                    parts = PurePosixPath(member.name).parts
                    if member.isfile() and len(parts) >= 3 and parts[-3] in (_TRAIN, *_EVAL_SPLITS) \
                            and _is_image_name(parts[-1]):
                        key = parts[-3:]
                        if key in out:
                            raise InputError(f"{who}{'/'.join(key)} is in more than one shard ({out[key][0]} and "
                                             f"{path})")
                        roots.add(parts[:-3])
                        out[key] = (str(path), member.offset_data, member.size)
        except tarfile.ReadError as e:
            raise InputError(f"{who}cannot read {path} as an uncompressed tar archive ({e}); a compressed archive "
                             "cannot be read at random: decompress it (gunzip) or extract it, or hold the set in "
                             "memory with data.loader=memory") from e
    if len(roots) > 1:
        raise InputError(f"{who}the archives hold split folders under several folders "
                         f"({', '.join(repr('/'.join(r) + '/') for r in sorted(roots))}); expected one")
    return out


def _shards(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(".tar"))


def is_sharded(root: str | os.PathLike) -> bool:
    """Whether `root` is a folder of .tar shards (and not itself an ImageFolder folder)."""
    path = Path(root).expanduser()
    return path.is_dir() and not (path / _TRAIN).is_dir() and bool(_shards(path))


def streamable(root: str | os.PathLike) -> bool:
    """Whether `root` can be streamed: a folder in ImageFolder layout, an uncompressed .tar, or tar shards."""
    path = Path(root).expanduser()
    if path.is_file():
        return path.name.lower().endswith(".tar")
    if is_sharded(path):
        return True
    try:
        found = _find(path)
    except (FileNotFoundError, ValueError):
        return False
    return found.is_dir() or found.name.lower().endswith(".tar")


def index_imagefolder(root: str | os.PathLike) -> tuple[ImageFiles, ImageFiles]:
    """The (train, test) image files of an ImageFolder set, without decoding: `root` is a folder (as
    `load_imagefolder` reads), an uncompressed `.tar` of one, or a folder of `.tar` shards that together hold one
    (train/<class>/<image> and test/ or val/ members). Order and labels are those of `load_imagefolder`."""
    who = "streaming loader: "
    path = Path(root).expanduser()
    if is_sharded(path):
        shards = _shards(path)
        entries: dict = _tar_members(shards, who)
        where = f"{path} ({len(shards)} tar shards)"
    else:
        path = _find(path)
        if path.is_file():
            entries = _tar_members([path], who)
            where = f"{path} (tar)"
        else:
            entries = _list_folder(path)
            where = f"{path} (folder)"
    classes, _, train_keys, eval_keys = _ordered(entries, where)
    index = {cls: i for i, cls in enumerate(classes)}

    def files(keys) -> ImageFiles:
        return ImageFiles(tuple(entries[k] for k in keys),
                          torch.tensor([index[cls] for _, cls, _ in keys], dtype=torch.int64), tuple(classes),
                          f"{where}; streamed")

    return files(train_keys), files(eval_keys)


def default_workers() -> int:
    """DataLoader workers per process: the node's CPU cores shared among its processes, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // dist.local_world_size()))


class _Decoded(Dataset):
    """Item i: the image decoded, resized (shorter side) and centre-cropped to `resize`² as `load_imagefolder`
    stores it (then to `crop`² when given: the evaluation crop), and its label."""

    def __init__(self, files: ImageFiles, resize: int, crop: int | None):
        self.files, self.resize, self.crop = files, resize, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.files.items[i]
        what = item.name if isinstance(item, Path) else f"{item[0]}@{item[1]}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            image = _decode(self.files.read(i), what, self.resize, self.files.source)
        if self.crop is not None and self.crop != self.resize:
            image = TF.center_crop(image, [self.crop, self.crop]).contiguous()
        return image, int(self.files.labels[i])


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)


class _Plan:
    """The DataLoader's batch sampler: this epoch's index lists, set by `StreamLoader` before each pass."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader(_Batcher):
    """Batches (x, y) of image files read every epoch by `workers` DataLoader processes; see the module docstring.

    Arguments mean what they mean for `DeviceLoader` (`crop` is "rrc", ImageNet-style); `resize` is the side the
    images are decoded to (as `load_imagefolder(resize=...)`), `workers` the DataLoader worker processes (0: decode
    in this process).
    """

    def __init__(self, files: ImageFiles, batch_size: int, *, train: bool, resize: int,
                 device: torch.device | str = "cpu", indices: torch.Tensor | Sequence[int] | None = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 augment: bool | None = None, shuffle: bool | None = None, drop_last: bool | None = None,
                 seed: int = 0, channels_last: bool = False, dtype: torch.dtype = torch.float32, crop: str = "rrc",
                 pad: int | None = None, image_size: int | None = None, crop_scale: Sequence[float] | None = None,
                 cutout: int = 0, shard: tuple[int, int] | None = None, workers: int | None = None) -> None:
        if not isinstance(files, ImageFiles):
            raise InputTypeError(f"StreamLoader: files must be ImageFiles (see index_imagefolder), got "
                                 f"{type(files).__name__}")
        if not isinstance(resize, int) or isinstance(resize, bool) or resize < 1:
            raise InputError(f"StreamLoader: resize must be an int >= 1, got {resize!r}")
        workers = default_workers() if workers is None else workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise InputError(f"StreamLoader: workers must be an int >= 0, got {workers!r}")
        self._setup("StreamLoader", (resize, resize), files.classes, batch_size, train=train, device=device,
                    mean=mean, std=std, augment=augment, shuffle=shuffle, drop_last=drop_last, seed=seed,
                    channels_last=channels_last, dtype=dtype, crop=crop, pad=pad, image_size=image_size,
                    crop_scale=crop_scale, cutout=cutout)
        if indices is not None:
            files = files.subset(indices)
        self.files, self.resize, self.workers = files, resize, workers
        self._check_size(len(files), shard, "StreamLoader")
        crop_to = None if self.augment else self._crop.size[0]  # the evaluation crop, made in the workers
        self._plan_batches = _Plan()
        self._loader = DataLoader(_Decoded(files, resize, crop_to), batch_sampler=self._plan_batches,
                                  num_workers=workers, collate_fn=_collate,
                                  pin_memory=self._device.type == "cuda", persistent_workers=workers > 0,
                                  prefetch_factor=4 if workers > 0 else None)

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label of the files (no decoding)."""
        lo, hi = torch.aminmax(self.files.labels)
        return int(lo), int(hi)

    def label_counts(self) -> list[int]:
        """How many files hold each label 0, 1, ... (no decoding: for the run's fingerprint)."""
        return torch.bincount(self.files.labels).tolist()

    def sample_digest(self, indices: Sequence[int]) -> str:
        """SHA-256 of the identity of the files at `indices` (class folder, name and size of a file; archive name,
        offset and size of a tar member) and their labels. The pixels are not read: decoding is the workers' job,
        and the identity is enough to tell another set (for the run's fingerprint)."""
        h = hashlib.sha256()
        for i in indices:
            item = self.files.items[i]
            if isinstance(item, tuple):
                who = f"{Path(item[0]).name}@{item[1]}+{item[2]}"
            else:
                path = Path(item)
                who = f"{path.parent.name}/{path.name}+{path.stat().st_size}"
            h.update(f"{who}:{int(self.files.labels[i])};".encode())
        return h.hexdigest()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, params, centres = self._plan(self._next_epoch())
        bounds = list(self._bounds())
        self._plan_batches.batches = [(order[s:e] if order is not None else torch.arange(s, e)).tolist()
                                      for s, e in bounds]
        return self._batches(bounds, params, centres)

    def _batches(self, bounds, params, centres) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dev = self._device
        for (s, e), (x, y) in zip(bounds, self._loader, strict=True):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            yield self._finish(x, [p[s:e].to(dev) for p in params],
                               None if centres is None else centres[s:e].to(dev)), y

    def __repr__(self) -> str:
        return f"StreamLoader({self._describe()}, resize={self.resize}, workers={self.workers})"
