"""Batched on-device augmentations: pad-crop, random-resized-crop, horizontal flip and cutout, without Python loops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["augment_batch", "cutout_batch", "random_resized_boxes", "resized_crop_batch"]

RATIO = (3 / 4, 4 / 3)  # aspect ratios (width / height) of random-resized-crop boxes, as torchvision's default
_TRIES = 10


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a batch [B, C, H, W], on its device, without a loop.

    Sample b is padded by `pad` zeros on each side, cropped back to H x W at row `offsets[b, 0]` and column
    `offsets[b, 1]` of the padded image (each in [0, 2 * pad], not checked: that would sync), then mirrored
    left-right where `flips[b]` is true. Same as torchvision RandomCrop(H, padding=pad) then RandomHorizontalFlip.
    """
    if images.dim() != 4:
        raise InputError(f"augment_batch: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise InputError(f"augment_batch: offsets must be [{b}, 2] and flips [{b}], got {tuple(offsets.shape)} "
                         f"and {tuple(flips.shape)}")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise InputError(f"augment_batch: pad must be an int >= 0, got {pad!r}")
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    hp, wp = h + 2 * pad, w + 2 * pad
    offsets = offsets.to(device, torch.int64)
    rows = offsets[:, :1] + torch.arange(h, device=device)  # [B, H]: padded-image row of each output row
    cols = offsets[:, 1:] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flips.to(device, torch.bool)[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


def random_resized_boxes(n: int, height: int, width: int, scale: Sequence[float], generator: torch.Generator,
                         ratio: Sequence[float] = RATIO) -> torch.Tensor:
    """`n` random crop boxes (top, left, box height, box width) as int64 [n, 4] on the CPU, as RandomResizedCrop.

    Each box covers a fraction of the image area drawn uniformly from `scale` with an aspect ratio (width / height)
    log-uniform in `ratio`; of 10 tries per sample the first that fits is placed uniformly at random, and when none
    fits the box is the largest centred one within `ratio` (the whole image when its own ratio lies in `ratio`).
    """
    lo, hi = _check_range("scale", scale, upper=1.0)
    rlo, rhi = _check_range("ratio", ratio, upper=math.inf)
    for what, value in (("n", n), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if what == "n" else 1):
            raise InputError(f"random_resized_boxes: {what} must be an int >= {0 if what == 'n' else 1}, "
                             f"got {value!r}")
    f64 = torch.float64
    area = height * width * (lo + (hi - lo) * torch.rand(n, _TRIES, generator=generator, dtype=f64))
    aspect = torch.exp(math.log(rlo) + (math.log(rhi) - math.log(rlo))
                       * torch.rand(n, _TRIES, generator=generator, dtype=f64))
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    where = torch.rand(n, 2, generator=generator, dtype=f64)
    top = (where[:, 0] * (height - h + 1)).long().clamp(max=height - h)
    left = (where[:, 1] * (width - w + 1)).long().clamp(max=width - w)
    fh, fw = height, width
    if width / height < rlo:
        fh = min(height, max(1, round(width / rlo)))
    elif width / height > rhi:
        fw = min(width, max(1, round(height * rhi)))
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    boxes = torch.stack([top, left, h, w], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def resized_crop_batch(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor | None, size: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Crop box b (top, left, height, width) of each image in [B, C, H, W], resize it to `size` x `size`, mirror it
    left-right where `flips[b]`; on the images' device, in `dtype`, in the images' value range.

    The resize is antialiased bilinear (triangle filter widened by the downscale factor, renormalised inside the
    box), as torchvision's resized_crop with antialias=True on float images, done as two batched matrix products.
    Boxes must lie inside the images (not checked: that would sync).
    """
    if images.dim() != 4:
        raise InputError(f"resized_crop_batch: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if boxes.shape != (b, 4) or (flips is not None and flips.shape != (b,)):
        raise InputError(f"resized_crop_batch: boxes must be [{b}, 4] and flips [{b}] or None, got "
                         f"{tuple(boxes.shape)} and {None if flips is None else tuple(flips.shape)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InputError(f"resized_crop_batch: size must be an int >= 1, got {size!r}")
    boxes = boxes.to(images.device, dtype)
    rows = _resize_weights(boxes[:, 0], boxes[:, 2], size, h)  # [B, size, H]
    cols = _resize_weights(boxes[:, 1], boxes[:, 3], size, w)  # [B, size, W]
    if flips is not None:
        cols = torch.where(flips.to(images.device, torch.bool)[:, None, None], cols.flip(1), cols)
    return rows[:, None] @ images.to(dtype) @ cols.transpose(1, 2)[:, None]


def cutout_batch(x: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """`x` [B, C, H, W] with, in sample b, the square of side `size` centred at pixel (row, col) `centres[b]` set to
    0 (clipped at the borders), as DARTS' Cutout; rows and columns [centre - size // 2, centre - size // 2 + size).
    """
    if x.dim() != 4:
        raise InputError(f"cutout_batch: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if centres.shape != (x.shape[0], 2):
        raise InputError(f"cutout_batch: centres must be [{x.shape[0]}, 2], got {tuple(centres.shape)}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError(f"cutout_batch: size must be an int >= 0, got {size!r}")
    start = centres.to(x.device, torch.int64) - size // 2  # [B, 2]
    rows = torch.arange(x.shape[2], device=x.device) - start[:, :1]  # [B, H]: position inside the square
    cols = torch.arange(x.shape[3], device=x.device) - start[:, 1:]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return x.masked_fill(inside[:, None], 0)


def _resize_weights(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """[B, out, size]: row k holds the weights of the `size` input pixels for output pixel k of each box."""
    scale = length / out  # [B]: input pixels per output pixel
    centre = start[:, None] + (torch.arange(out, device=start.device, dtype=start.dtype) + 0.5) * scale[:, None]
    pixel = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5  # [size]: input pixel centres
    support = scale.clamp(min=1.0)[:, None, None]
    weights = (1 - (pixel - centre[:, :, None]).abs() / support).clamp(min=0)  # [B, out, size]
    inside = (pixel >= start[:, None]) & (pixel < (start + length)[:, None])  # [B, size]
    weights = weights * inside[:, None, :]
    return weights / weights.sum(2, keepdim=True)


def _check_range(what: str, values: Sequence[float], upper: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (0 < lo <= hi <= upper and math.isfinite(hi)):
        bound = "<= 1" if upper == 1.0 else "finite"
        raise InputError(f"random_resized_boxes: {what} must be [min, max] with 0 < min <= max ({bound}), "
                         f"got {values!r}")
    return lo, hi
