"""A batch iterator that keeps a whole image set on the training device and augments it there."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cifar import CIFAR10_MEAN, CIFAR10_STD
from .imageset import ImageSet, _as_index

__all__ = ["DeviceLoader", "augment_batch", "epoch_generator"]


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a batch [B, C, H, W], on its device, without a loop.

    Sample b is padded by `pad` zeros on each side, cropped back to H x W at row `offsets[b, 0]` and column
    `offsets[b, 1]` of the padded image (each in [0, 2 * pad], not checked: that would sync), then mirrored
    left-right where `flips[b]` is true. Same as torchvision RandomCrop(H, padding=pad) then RandomHorizontalFlip.
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(f"augment_batch: offsets must be [{b}, 2] and flips [{b}], got {tuple(offsets.shape)} "
                         f"and {tuple(flips.shape)}")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"augment_batch: pad must be an int >= 0, got {pad!r}")
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    hp, wp = h + 2 * pad, w + 2 * pad
    offsets = offsets.to(device, torch.int64)
    rows = offsets[:, :1] + torch.arange(h, device=device)  # [B, H]: padded-image row of each output row
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flips.to(device, torch.bool)[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class DeviceLoader:
    """Batches (x, y) of an ImageSet held on `device`: x normalised float [B, 3, H, W], y int64 [B].

    The uint8 images (those at `indices`, if given) move to `device` once. `augment`, `shuffle` and `drop_last`
    default to `train`. Each `iter()` runs the epoch set by `set_epoch` (0 at first) and then advances it by one;
    its order, crop offsets and flips are drawn up front on the CPU from (seed, epoch), so a resumed run sees the
    same batches and no batch waits on the host.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, train: bool, device: torch.device | str = "cpu",
                 indices: torch.Tensor | Sequence[int] | None = None, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, augment: bool | None = None, shuffle: bool | None = None,
                 drop_last: bool | None = None, seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, pad: int = 4) -> None:
        if not isinstance(data, ImageSet):
            raise TypeError(f"DeviceLoader: data must be an ImageSet, got {type(data).__name__}")
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("pad", pad, 0)
        for flag, value in (("train", train), ("augment", augment), ("shuffle", shuffle), ("drop_last", drop_last),
                            ("channels_last", channels_last)):
            if not isinstance(value, bool) and not (value is None and flag in ("augment", "shuffle", "drop_last")):
                raise TypeError(f"DeviceLoader: {flag} must be a bool{'' if flag == 'train' else ' or None'}, "
                                f"got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"DeviceLoader: dtype must be a floating torch.dtype, got {dtype!r}")
        mean_t, std_t = _channel_stats("mean", mean), _channel_stats("std", std)
        if bool((std_t <= 0).any()):
            raise ValueError(f"DeviceLoader: std must be > 0 per channel, got {tuple(std)}")

        self._device = torch.device(device)
        self._classes = data.classes
        self._batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.pad = pad
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0

        images, labels = data.images, data.labels
        if indices is not None:
            idx = _as_index(indices, len(data), "DeviceLoader: indices")
            images, labels = images.index_select(0, idx), labels.index_select(0, idx)
        if len(labels) == 0 or (self.drop_last and len(labels) < batch_size):
            raise ValueError(f"DeviceLoader: {len(labels)} samples make no batch of batch_size={batch_size} "
                             f"(drop_last={self.drop_last})")
        self._images = images.to(self._device)
        self._labels = labels.to(self._device)
        # (x / 255 - mean) / std as one multiply-add, computed in float32 (float64 if asked) and cast after.
        self._math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self._device, self._math_dtype)
        self._shift = (mean_t / std_t).view(1, 3, 1, 1).to(self._device, self._math_dtype)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def num_samples(self) -> int:
        return len(self._labels)

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        n, b = self.num_samples, self._batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` run epoch `epoch` (its order and augmentation depend only on seed and epoch)."""
        _check_int("epoch", epoch, 0)
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self._batch_size
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=generator).to(self._device) if self.shuffle else None
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).to(self._device)
            flips = (torch.rand(n, generator=generator) < 0.5).to(self._device)
        stop = n - n % b if self.drop_last else n
        for start in range(0, stop, b):
            end = min(start + b, n)
            if order is None:
                x, y = self._images[start:end], self._labels[start:end]
            else:
                idx = order[start:end]
                x, y = self._images.index_select(0, idx), self._labels.index_select(0, idx)
            if self.augment:
                x = augment_batch(x, offsets[start:end], flips[start:end], self.pad)
            yield self._normalise(x), y

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt).to(self._math_dtype).mul_(self._scale).sub_(self._shift)
        return x.to(self.dtype)

    def __repr__(self) -> str:
        return (f"DeviceLoader(n={self.num_samples}, batch_size={self._batch_size}, device={self._device}, "
                f"augment={self.augment}, shuffle={self.shuffle}, drop_last={self.drop_last}, seed={self.seed})")


def _check_int(what: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"DeviceLoader: {what} must be an int >= {low}, got {value!r}")


def _channel_stats(what: str, values: Sequence[float]) -> torch.Tensor:
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        t = None
    if t is None or t.shape != (3,) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"DeviceLoader: {what} must be 3 finite numbers (one per channel), got {values!r}")
    return t
