"""A batch iterator that keeps a whole image set on the training device and augments it there."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from ..errors import InputError, InputTypeError
from .augment import augment_batch, cutout_batch, random_resized_boxes, resized_crop_batch
from .cifar import CIFAR10_MEAN, CIFAR10_STD
from .imageset import ImageSet, _as_index

__all__ = ["DeviceLoader", "epoch_generator", "shard_bounds"]

DEFAULT_CROP_SCALE = (0.08, 1.0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _PadCrop:
    """CIFAR's augmentation: zero-pad by `pad`, crop back to the image size at a random offset, flip at random."""

    def __init__(self, height: int, width: int, pad: int | None, image_size: int | None,
                 crop_scale: Sequence[float] | None) -> None:
        if image_size is not None or crop_scale is not None:
            raise InputError(f"DeviceLoader: image_size and crop_scale are used only with crop='rrc', got "
                             f"image_size={image_size!r}, crop_scale={crop_scale!r} with crop='pad'")
        self.pad = 4 if pad is None else pad
        _check_int("pad", self.pad, 0)
        self.size = (height, width)

    def stored(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        return images

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        return offsets, torch.rand(n, generator=generator) < 0.5

    def apply(self, x: torch.Tensor, params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return augment_batch(x, params[0], params[1], self.pad)

    def __repr__(self) -> str:
        return f"crop='pad', pad={self.pad}"


class _ResizedCrop:
    """ImageNet-style augmentation: a random-resized crop to `image_size`, flipped at random; the centre crop to
    evaluate."""

    def __init__(self, height: int, width: int, pad: int | None, image_size: int | None,
                 crop_scale: Sequence[float] | None) -> None:
        if pad is not None:
            raise InputError(f"DeviceLoader: pad is used only with crop='pad', got pad={pad!r} with crop='rrc'")
        size = min(height, width) if image_size is None else image_size
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= min(height, width):
            raise InputError(f"DeviceLoader: image_size must be an int in [1, {min(height, width)}] (at most the "
                             f"stored {height}x{width} images' shorter side) or None, got {image_size!r}")
        scale = DEFAULT_CROP_SCALE if crop_scale is None else crop_scale
        try:
            lo, hi = (float(v) for v in scale)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not 0 < lo <= hi <= 1:
            raise InputError(f"DeviceLoader: crop_scale must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
        self.image_size, self.crop_scale, self.stored_size = size, (lo, hi), (height, width)
        self.size = (size, size)

    def stored(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        return images if augment else TF.center_crop(images, [self.image_size] * 2).contiguous()

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        boxes = random_resized_boxes(n, *self.stored_size, self.crop_scale, generator)
        return boxes, torch.rand(n, generator=generator) < 0.5

    def apply(self, x: torch.Tensor, params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return resized_crop_batch(x, params[0], params[1], self.image_size, dtype)

    def __repr__(self) -> str:
        return f"crop='rrc', image_size={self.image_size}, crop_scale={self.crop_scale}"


_CROPS = {"pad": _PadCrop, "rrc": _ResizedCrop}


def shard_bounds(start: int, end: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The part of the global batch [start, end) that rank `shard[0]` of `shard[1]` takes: consecutive slices in
    rank order whose sizes differ by at most one, so the ranks' slices make up the batch exactly."""
    if shard is None:
        return start, end
    r, world = shard
    n = end - start
    return start + r * n // world, start + (r + 1) * n // world


def _check_shard(shard: object, batch_size: int, drop_last: bool, who: str) -> tuple[int, int] | None:
    if shard is None:
        return None
    if (not isinstance(shard, tuple) or len(shard) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise InputError(f"{who}: shard must be (rank, world size) with 0 <= rank < world size, got {shard!r}")
    if shard[1] == 1:
        return None
    if drop_last and batch_size % shard[1]:
        raise InputError(f"{who}: batch_size={batch_size} is the global batch, split over {shard[1]} processes; it "
                         f"must be a multiple of {shard[1]} (or give each process its own batch: dist.batch=process)")
    return shard


class _Batcher:
    """What the device-resident and the streaming loader share: options, the epoch's order and augmentation draws
    (a pure function of seed and epoch), the rank's slice of each global batch, and augmenting and normalising a
    uint8 batch on the device."""

    def _setup(self, who: str, stored_hw: Sequence[int], classes: tuple[str, ...], batch_size: int, *, train: bool,
               device, mean, std, augment, shuffle, drop_last, seed, channels_last, dtype, crop, pad, image_size,
               crop_scale, cutout) -> None:
        _check_int("batch_size", batch_size, 1, who)
        _check_int("seed", seed, 0, who)
        _check_int("cutout", cutout, 0, who)
        for flag, value in (("train", train), ("augment", augment), ("shuffle", shuffle), ("drop_last", drop_last),
                            ("channels_last", channels_last)):
            if not isinstance(value, bool) and not (value is None and flag in ("augment", "shuffle", "drop_last")):
                raise InputTypeError(f"{who}: {flag} must be a bool{'' if flag == 'train' else ' or None'}, "
                                     f"got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputTypeError(f"{who}: dtype must be a floating torch.dtype, got {dtype!r}")
        if not isinstance(crop, str) or crop not in _CROPS:
            raise InputError(f"{who}: crop must be one of {sorted(_CROPS)}, got {crop!r}")
        mean_t, std_t = _channel_stats("mean", mean, who), _channel_stats("std", std, who)
        if bool((std_t <= 0).any()):
            raise InputError(f"{who}: std must be > 0 per channel, got {tuple(std)}")
        self._crop = _CROPS[crop](*stored_hw, pad, image_size, crop_scale)

        self._device = torch.device(device)
        self._classes = classes
        self._batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.cutout = cutout
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0
        if cutout and not self.augment:
            raise InputError(f"{who}: cutout={cutout} is applied only to augmented batches, but augment=False; "
                             "set cutout=0 or augment=True")
        # (x / 255 - mean) / std as one multiply-add, computed in float32 (float64 if asked) and cast after.
        self._math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self._device, self._math_dtype)
        self._shift = (mean_t / std_t).view(1, 3, 1, 1).to(self._device, self._math_dtype)

    def _check_size(self, n: int, shard, who: str) -> None:
        if n == 0 or (self.drop_last and n < self._batch_size):
            raise InputError(f"{who}: {n} samples make no batch of batch_size={self._batch_size} "
                             f"(drop_last={self.drop_last})")
        self.shard = _check_shard(shard, self._batch_size, self.drop_last, who)

    @property
    def batch_size(self) -> int:
        """Samples per batch this loader yields (this process's share of the global batch when sharded)."""
        return self._batch_size if self.shard is None else -(-self._batch_size // self.shard[1])

    @property
    def global_batch_size(self) -> int:
        """Samples per batch over all processes (= `batch_size` unsharded)."""
        return self._batch_size

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every x this loader yields."""
        return (3, *self._crop.size)

    @property
    def pad(self) -> int | None:
        return getattr(self._crop, "pad", None)

    def __len__(self) -> int:
        n, b = self.num_samples, self._batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` run epoch `epoch` (its order and augmentation depend only on seed and epoch)."""
        _check_int("epoch", epoch, 0, type(self).__name__)
        self.epoch = epoch

    def _next_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def _plan(self, epoch: int) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor | None]:
        """The epoch's sample order (None: in order), per-sample augmentation parameters and cutout centres, drawn
        on the CPU from (seed, epoch) for the whole set, in this order."""
        n = self.num_samples
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else None
        params: list[torch.Tensor] = []
        centres = None
        if self.augment:
            params = list(self._crop.draw(n, generator))
            if self.cutout:
                h, w = self._crop.size
                centres = torch.stack([torch.randint(0, h, (n,), generator=generator),
                                       torch.randint(0, w, (n,), generator=generator)], 1)
        return order, params, centres

    def _bounds(self) -> Iterator[tuple[int, int]]:
        """[start, end) in the epoch's order of each batch this rank takes."""
        n, b = self.num_samples, self._batch_size
        stop = n - n % b if self.drop_last else n
        for first in range(0, stop, b):
            start, end = shard_bounds(first, min(first + b, n), self.shard)
            if start < end:  # (a last partial batch smaller than the number of processes leaves some ranks none)
                yield start, end

    def _finish(self, x: torch.Tensor, params: Sequence[torch.Tensor], centres: torch.Tensor | None) -> torch.Tensor:
        """Augment (with this batch's parameters) and normalise a uint8 batch on the device."""
        if self.augment:
            x = self._crop.apply(x, params, self._math_dtype)
        return self._normalise(x, centres)

    def _normalise(self, x: torch.Tensor, centres: torch.Tensor | None) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt).to(self._math_dtype).mul_(self._scale).sub_(self._shift)
        if centres is not None:
            x = cutout_batch(x, centres, self.cutout)
        return x.to(self.dtype)

    def _describe(self) -> str:
        cut = f", cutout={self.cutout}" if self.cutout else ""
        shard = f", shard={self.shard}" if self.shard is not None else ""
        return (f"n={self.num_samples}, batch_size={self._batch_size}, device={self._device}, "
                f"augment={self.augment}, {self._crop!r}{cut}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
                f"seed={self.seed}{shard}")


class DeviceLoader(_Batcher):
    """Batches (x, y) of an ImageSet held on `device`: x normalised float [B, 3, H, W], y int64 [B].

    The uint8 images (those at `indices`, if given) move to `device` once. `augment`, `shuffle` and `drop_last`
    default to `train`. Each `iter()` runs the epoch set by `set_epoch` (0 at first) and then advances it by one;
    its order and augmentation draws are made up front on the CPU from (seed, epoch), so a resumed run sees the
    same batches and no batch waits on the host.

    `crop` picks the augmentation: "pad" (CIFAR: pad by `pad` (4) with zeros, crop back at random, flip; the images
    as they are to evaluate) or "rrc" (a random-resized crop of `crop_scale` (0.08 to 1) of the area and aspect
    ratio 3/4 to 4/3, resized to `image_size` (the stored side) and flipped; the centre `image_size` crop to
    evaluate). `cutout` > 0 zeroes one square of that side per training sample after normalising, centred
    uniformly at random and clipped at the borders (needs augmentation).

    `shard=(rank, world)` makes this loader one process's part of a run over `world` processes: `batch_size` is
    then the global batch, and each batch is the rank's consecutive slice of the global batch the unsharded loader
    yields (same order, same augmentation draws), so the ranks' slices make up that batch exactly.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, train: bool, device: torch.device | str = "cpu",
                 indices: torch.Tensor | Sequence[int] | None = None, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, augment: bool | None = None, shuffle: bool | None = None,
                 drop_last: bool | None = None, seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, crop: str = "pad", pad: int | None = None,
                 image_size: int | None = None, crop_scale: Sequence[float] | None = None, cutout: int = 0,
                 shard: tuple[int, int] | None = None) -> None:
        if not isinstance(data, ImageSet):
            raise InputTypeError(f"DeviceLoader: data must be an ImageSet, got {type(data).__name__}")
        self._setup("DeviceLoader", data.images.shape[2:], data.classes, batch_size, train=train, device=device,
                    mean=mean, std=std, augment=augment, shuffle=shuffle, drop_last=drop_last, seed=seed,
                    channels_last=channels_last, dtype=dtype, crop=crop, pad=pad, image_size=image_size,
                    crop_scale=crop_scale, cutout=cutout)
        images, labels = data.images, data.labels
        if indices is not None:
            idx = _as_index(indices, len(data), "DeviceLoader: indices")
            images, labels = images.index_select(0, idx), labels.index_select(0, idx)
        self._n = len(labels)
        self._check_size(self._n, shard, "DeviceLoader")
        self._images = self._crop.stored(images, self.augment).to(self._device)
        self._labels = labels.to(self._device)

    @property
    def num_samples(self) -> int:
        return self._n

    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label this loader holds (one host sync: for checks before training)."""
        lo, hi = torch.aminmax(self._labels)
        return int(lo), int(hi)

    def label_counts(self) -> list[int]:
        """How many samples hold each label 0, 1, ... (one host sync: for the run's fingerprint)."""
        return torch.bincount(self._labels).tolist()

    def sample_digest(self, indices: Sequence[int]) -> str:
        """SHA-256 of the stored (not augmented) images and the labels at `indices` (for the run's fingerprint)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self._device)
        h = hashlib.sha256()
        for t in (self._images.index_select(0, idx), self._labels.index_select(0, idx)):
            h.update(t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(self._next_epoch())

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, params, centres = self._plan(epoch)
        if order is not None:
            order = order.to(self._device)
        params = [p.to(self._device) for p in params]
        if centres is not None:
            centres = centres.to(self._device)
        for start, end in self._bounds():
            if order is None:
                x, y = self._images[start:end], self._labels[start:end]
            else:
                idx = order[start:end]
                x, y = self._images.index_select(0, idx), self._labels.index_select(0, idx)
            yield self._finish(x, [p[start:end] for p in params], None if centres is None else centres[start:end]), y

    def __repr__(self) -> str:
        return f"DeviceLoader({self._describe()})"


def _check_int(what: str, value: object, low: int, who: str = "DeviceLoader") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{who}: {what} must be an int >= {low}, got {value!r}")


def _channel_stats(what: str, values: Sequence[float], who: str = "DeviceLoader") -> torch.Tensor:
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        t = None
    if t is None or t.shape != (3,) or not bool(torch.isfinite(t).all()):
        raise InputError(f"{who}: {what} must be 3 finite numbers (one per channel), got {values!r}")
    return t
