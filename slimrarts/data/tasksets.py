"""Segmentation and detection data in the formats people have, read by DataLoader workers.

- `SegmentationFolder`: images with PNG class-index masks in Pascal VOC's layout: `JPEGImages/<id>.jpg` (or .png),
  `SegmentationClass/<id>.png` (palette or 8-bit grey PNGs whose pixel values are class indices; `ignore_index`,
  255 in VOC, marks pixels no loss reads), `ImageSets/Segmentation/<split>.txt` (one id per line) and, optionally,
  `classes.txt` (one class name per line, line i naming index i). Batches are `(images, masks)`.
- `CocoDetection`: COCO detection JSON (read by pycocotools) with its images: `annotations/instances_<split>*.json`
  and the images in `<split>*/` (e.g. `instances_train2017.json` and `train2017/`). Categories become labels
  1..K in the order of their ids, 0 being the background torchvision's detectors reserve; crowd annotations are
  left out; images without annotations are kept (a detector learns from them too). Batches are `(images,
  targets)`: lists, so images of different sizes batch together (`detection_collate`).

Both check the whole set before any training starts and name the file and what is wrong: a missing image or
mask, a mask of another size than its image or with values outside the classes, a colour (RGB) mask, a box
outside its image or of no area, an unknown category. Augmentation is torchvision's `transforms.v2`, which moves
masks and boxes with the image (`segmentation_transform`, `detection_transform`); `task_loaders` makes the four
loaders a pruning run needs from two such data sets.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..engine import dist
from ..errors import DataError, InputError, InputTypeError, MissingExtraError, MissingFileError
from .factory import Loaders, as_loaders
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD
from .registry import register_dataset
from .stream import default_workers

__all__ = ["CocoDetection", "SegmentationFolder", "detection_collate", "detection_transform",
           "segmentation_transform", "task_loaders"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_BOX_SLACK = 1.0  # pixels a COCO box may reach past its image's edge (rounding in annotation tools); it is clipped


def _pil():
    from PIL import Image  # torchvision's dependency

    return Image


def _read_rgb(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] of an image file (grey, palette and alpha made RGB)."""
    try:
        with _pil().open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _read_mask(path: Path) -> np.ndarray:
    """The class indices [H, W] of a palette or grey PNG mask; a colour mask is refused."""
    try:
        with _pil().open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"mask {str(path)!r} is a {im.mode} image; masks hold one class index per pixel "
                                "(a palette 'P' or grey 'L' PNG, as VOC's SegmentationClass): convert colour masks "
                                "to indices first")
            return np.asarray(im).astype(np.int64)
    except OSError as err:
        raise DataError(f"cannot read mask {str(path)!r}: {err}") from err


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it."""
    try:
        with _pil().open(path) as im:
            return im.size
    except OSError as err:
        raise DataError(f"cannot read image {str(path)!r}: {err}") from err


def _check_root(root: Any, who: str) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise InputTypeError(f"{who}: root must be a path (str or os.PathLike), got {root!r}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"{who}: root {str(path)!r} is not a folder")
    return path


class SegmentationFolder(Dataset):
    """Split `split` of a VOC-layout segmentation set (see the module's docstring); items are `(image, mask)`:
    `transform(image, mask)` of a uint8 `[3, H, W]` image and an int64 `[H, W]` mask as torchvision tv_tensors,
    or those two tensors when `transform` is None.

    The classes are `classes.txt`'s lines, or `num_classes` (indices 0..num_classes-1) when there is none. Every
    mask is read once here: its size must be its image's and its values classes or `ignore_index`; the first
    mask that is not names its file, the values and what is allowed.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, num_classes: int | None = None,
                 ignore_index: int = 255, transform: Callable | None = None, check: bool = True):
        self.root = _check_root(root, "SegmentationFolder")
        for what, value in (("num_classes", num_classes), ("ignore_index", ignore_index)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InputError(f"SegmentationFolder: {what} must be an int >= 0, got {value!r}")
        self.classes = self._classes(num_classes)
        self.ignore_index = ignore_index
        self.split = split
        self.transform = transform
        self.ids = self._ids(split)
        self.images = [self._image_of(i) for i in self.ids]
        self.masks = [self.root / "SegmentationClass" / f"{i}.png" for i in self.ids]
        missing = [str(m) for m in self.masks if not m.is_file()]
        if missing:
            raise MissingFileError(f"SegmentationFolder: {len(missing)} mask(s) of split {split!r} are missing, "
                                   f"e.g. {missing[0]!r} (each id in ImageSets/Segmentation/{split}.txt needs "
                                   "SegmentationClass/<id>.png)")
        self.pixel_counts = self._check_masks() if check else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _classes(self, num_classes: int | None) -> tuple[str, ...]:
        file = self.root / "classes.txt"
        if file.is_file():
            names = tuple(line.strip() for line in file.read_text().splitlines() if line.strip())
            if not names:
                raise DataError(f"SegmentationFolder: {str(file)!r} names no class (one name per line)")
            if num_classes is not None and num_classes != len(names):
                raise InputError(f"SegmentationFolder: num_classes={num_classes}, but {str(file)!r} names "
                                 f"{len(names)} classes; give one of the two, or make them agree")
            return names
        if num_classes is None:
            raise InputError(f"SegmentationFolder: {str(self.root)!r} has no classes.txt (one class name per line, "
                             "line i naming index i), so num_classes must say how many classes the masks hold "
                             "(21 for Pascal VOC: background and 20 objects)")
        return tuple(str(i) for i in range(num_classes))

    def _ids(self, split: str) -> list[str]:
        listing = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            there = sorted(p.stem for p in listing.parent.glob("*.txt")) if listing.parent.is_dir() else []
            raise MissingFileError(f"SegmentationFolder: {str(listing)!r} does not exist (split {split!r}); the "
                                   f"splits there: {there or 'none'}")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"SegmentationFolder: {str(listing)!r} lists no image")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            twice = next(i for i in ids if i in seen or seen.add(i))
            raise DataError(f"SegmentationFolder: {str(listing)!r} lists {twice!r} more than once")
        return ids

    def _image_of(self, stem: str) -> Path:
        for suffix in _IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{stem}{suffix}"
            if path.is_file():
                return path
        raise MissingFileError(f"SegmentationFolder: no image for id {stem!r} of split {self.split!r}: looked for "
                               f"JPEGImages/{stem} with {', '.join(_IMAGE_SUFFIXES)} under {str(self.root)!r}")

    def _check_masks(self) -> torch.Tensor:
        """Pixels per class over the split (ignored pixels not counted); raises at the first bad mask."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for image, mask_file in zip(self.images, self.masks, strict=True):
            mask = _read_mask(mask_file)
            w, h = _image_size(image)
            if mask.shape != (h, w):
                raise DataError(f"mask {str(mask_file)!r} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{str(image)!r} is {w}x{h}; a mask labels each pixel of its image")
            values = np.unique(mask)
            bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
            if bad.size:
                raise DataError(f"mask {str(mask_file)!r} holds values {bad[:8].tolist()}, outside the "
                                f"{self.num_classes} classes (0..{self.num_classes - 1}) and not the ignore index "
                                f"{self.ignore_index}; check classes.txt / num_classes and the ignore index")
            keep = mask[mask != self.ignore_index]
            counts += np.bincount(keep.ravel(), minlength=self.num_classes)
        return torch.from_numpy(counts)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image = _read_rgb(self.images[i])
        mask = torch.from_numpy(_read_mask(self.masks[i]))
        if self.transform is None:
            return image, mask
        from torchvision import tv_tensors

        return self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))

    def __repr__(self) -> str:
        return (f"SegmentationFolder({str(self.root)!r}, split={self.split!r}: {len(self)} images, "
                f"{self.num_classes} classes, ignore_index={self.ignore_index})")


def _coco():
    try:
        from pycocotools.coco import COCO
    except ImportError as err:
        raise MissingExtraError("CocoDetection reads COCO JSON with pycocotools, which is not installed: pip install "
                                "'slimrarts[tasks]'") from err
    return COCO


def _find_split(root: Path, split: str) -> tuple[Path, Path]:
    """`annotations/instances_<split>*.json` and its image folder `<split>*/` (the same suffix) under `root`."""
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if len(found) != 1:
        there = sorted(p.name for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() \
            else []
        how = "none" if not found else f"{len(found)}: {[p.name for p in found]}"
        raise MissingFileError(f"CocoDetection: split {split!r} needs one annotations/instances_{split}*.json under "
                               f"{str(root)!r}, found {how} (the JSON files there: {there or 'none'}); or pass "
                               "ann_file= and images=")
    name = found[0].stem[len("instances_"):]
    images = root / name
    if not images.is_dir():
        raise MissingFileError(f"CocoDetection: {found[0].name} is read with its images in {str(images)!r}, which "
                               "is not a folder; or pass images=")
    return found[0], images


class CocoDetection(Dataset):
    """Split `split` of a COCO detection set (see the module's docstring); items are `(image, target)`:
    `transform(image, target)` of a uint8 `[3, H, W]` tv_tensors Image and `{"boxes": BoundingBoxes xyxy,
    "labels": int64 [n], "image_id": int}`, or the plain tensors when `transform` is None. `ann_file` and
    `images` name the JSON and the image folder directly.

    Every image's file and annotations are checked here (a missing file, an unknown category, a box of no area or
    more than a pixel outside its image are named errors; a box within a pixel of the edge is clipped to it).
    `empty_boxes="drop"` leaves boxes of no area out instead (COCO 2017's training JSON has a few of zero height),
    with one warning that counts them; their annotation ids are in `dropped`.
    `classes` is ("background", the categories' names in id order); `num_classes` counts the background.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", *,
                 ann_file: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                 transform: Callable | None = None, empty_boxes: str = "error"):
        if empty_boxes not in ("error", "drop"):
            raise InputError(f"CocoDetection: empty_boxes={empty_boxes!r}; choose 'error' (a box of no area is a "
                             "named error) or 'drop' (it is left out, and counted)")
        if (ann_file is None) != (images is None):
            raise InputError("CocoDetection: give ann_file= and images= together, or neither (then root and split "
                             "find them)")
        if ann_file is None:
            ann_file, images = _find_split(_check_root(root, "CocoDetection"), split)
        ann_file, images = Path(ann_file).expanduser(), _check_root(images, "CocoDetection images")
        if not ann_file.is_file():
            raise MissingFileError(f"CocoDetection: annotation file {str(ann_file)!r} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timings
            try:
                coco = _coco()(str(ann_file))
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"CocoDetection: {str(ann_file)!r} is not COCO detection JSON: {err!r}") from err
        self.ann_file, self.image_dir, self.split, self.transform = ann_file, images, split, transform
        cat_ids = sorted(coco.getCatIds())
        if not cat_ids:
            raise DataError(f"CocoDetection: {str(ann_file)!r} has no categories")
        self.label_of = {c: k + 1 for k, c in enumerate(cat_ids)}
        self.classes = ("background", *(str(coco.cats[c].get("name", c)) for c in cat_ids))
        self.empty_boxes, self.dropped = empty_boxes, []
        self.items = [self._item(coco, i) for i in sorted(coco.getImgIds())]
        if not self.items:
            raise DataError(f"CocoDetection: {str(ann_file)!r} lists no image")
        if self.dropped:
            warnings.warn(f"CocoDetection: {len(self.dropped)} box(es) of no area in {ann_file.name} left out "
                          f"(empty_boxes='drop'; annotation ids in .dropped, the first {self.dropped[0]})",
                          RuntimeWarning, stacklevel=2)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _item(self, coco, image_id: int) -> tuple[Path, int, np.ndarray, np.ndarray]:
        info = coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise MissingFileError(f"CocoDetection: image {image_id} of {self.ann_file.name} is "
                                   f"{str(path)!r}, which does not exist")
        w, h = info.get("width"), info.get("height")
        if w is None or h is None:
            w, h = _image_size(path)
        boxes, labels = [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            where = f"annotation {ann.get('id')} (image {str(path)!r}, {w}x{h}) in {self.ann_file.name}"
            if ann.get("category_id") not in self.label_of:
                raise DataError(f"CocoDetection: {where} has category_id {ann.get('category_id')!r}, which is "
                                f"not among the categories {sorted(self.label_of)}")
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                raise DataError(f"CocoDetection: {where} has bbox {ann['bbox']}, which is not finite")
            if x < -_BOX_SLACK or y < -_BOX_SLACK or x + bw > w + _BOX_SLACK or y + bh > h + _BOX_SLACK:
                raise DataError(f"CocoDetection: {where} has bbox {ann['bbox']}, which leaves the image; COCO "
                                "boxes are [x, y, width, height] in pixels of the image")
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x2 <= x1 or y2 <= y1:  # no width or height, or none left inside the image once clipped
                if self.empty_boxes == "drop":
                    self.dropped.append(ann.get("id"))
                    continue
                raise DataError(f"CocoDetection: {where} has bbox {ann['bbox']} of no area within the image (COCO "
                                "boxes are [x, y, width, height] in pixels, width and height > 0); "
                                "empty_boxes='drop' (data.empty_boxes: drop) leaves such boxes out")
            boxes.append((x1, y1, x2, y2))
            labels.append(self.label_of[ann["category_id"]])
        return (path, image_id, np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, dict]:
        path, image_id, boxes, labels = self.items[i]
        image = _read_rgb(path)
        target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                  "image_id": image_id}
        if self.transform is None:
            return image, target
        from torchvision import tv_tensors

        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image.shape[-2:])
        return self.transform(tv_tensors.Image(image), target)

    def __repr__(self) -> str:
        boxes = sum(len(item[3]) for item in self.items)
        return (f"CocoDetection({str(self.ann_file)!r}: {len(self)} images, {boxes} boxes, "
                f"{self.num_classes - 1} categories)")


def segmentation_transform(train: bool, size: int, *, scale: Sequence[float] = (0.25, 1.0),
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """`(image, mask) -> (float image, int64 mask)` for training (a random-resized crop to `size`² at `scale` of
    the area, flipped at random; the mask follows, nearest-neighbour) or evaluation (resized to `size`²); the
    image normalised by `mean`/`std`."""
    from torchvision.transforms import v2

    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise InputError(f"segmentation_transform: size must be an int >= 8, got {size!r}")
    geometry = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()] if train \
        else [v2.Resize((size, size), antialias=True)]
    steps = v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def apply(image, mask):
        image, mask = steps(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    return apply


def detection_transform(train: bool, *, crop: float = 0.5) -> Callable:
    """`(image, target) -> (float image in [0, 1], target)` for torchvision's detectors (they resize and
    normalise inside): for training, flipped at random and, with probability `crop`, an SSD-style random crop
    (`RandomIoUCrop`) whose boxes follow; boxes that leave the crop, or are under a pixel wide or high (or a
    square pixel in area) after it, are dropped with their labels. Evaluation keeps every box as the reader
    gives it."""
    from torchvision.transforms import v2

    if not 0.0 <= crop <= 1.0:
        raise InputError(f"detection_transform: crop must be a probability in [0, 1], got {crop!r}")
    geometry = [v2.RandomHorizontalFlip(), v2.RandomApply([v2.RandomIoUCrop()], p=crop)] if train and crop \
        else [v2.RandomHorizontalFlip()] if train else []
    steps = v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), *([v2.SanitizeBoundingBoxes()] if train
                                                                            else [])])

    def apply(image, target):
        image, target = steps(image, target)
        return image.as_subclass(torch.Tensor), {"boxes": target["boxes"].as_subclass(torch.Tensor),
                                                 "labels": target["labels"], "image_id": target["image_id"]}

    return apply


def detection_collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """`(images, targets)` lists of a batch of `(image, target)` items: images of different sizes batch together,
    as torchvision's detectors take them."""
    return [item[0] for item in batch], [item[1] for item in batch]


def task_loaders(train: Dataset, test: Dataset, *, batch_size: int, eval_batch_size: int | None = None,
                 workers: int = 0, seed: int = 0, collate_fn: Callable | None = None):
    """The four loaders of a pruning run (`Loaders`) over a training and a test data set of the readers above:
    DataLoaders with `workers` worker processes (shuffled from `seed`; each process its share under torchrun),
    the search halves split from `train` at random; `detection_collate` for `CocoDetection` sets."""
    for what, value in (("batch_size", batch_size), ("workers", workers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if what == "batch_size" else 0):
            raise InputError(f"task_loaders: {what} must be an int >= {1 if what == 'batch_size' else 0}, "
                             f"got {value!r}")
    if collate_fn is None and isinstance(train, CocoDetection):
        collate_fn = detection_collate
    common = dict(num_workers=workers, collate_fn=collate_fn, persistent_workers=workers > 0)
    if dist.world_size() > 1:
        sampler = DistributedSampler(train, shuffle=True, seed=seed)
        fit = DataLoader(train, batch_size=batch_size, sampler=sampler, **common)
    else:
        fit = DataLoader(train, batch_size=batch_size, shuffle=True,
                         generator=torch.Generator().manual_seed(seed), **common)
    evaluate = DataLoader(test, batch_size=eval_batch_size or batch_size, shuffle=False, **common)
    loaders = as_loaders({"train": fit, "test": evaluate}, seed=seed)
    classes = getattr(train, "num_classes", None)
    info = {"dataset": type(train).__name__, "train": len(train), "test": len(test),
            "search_t": len(loaders.search_t.dataset), "search_v": len(loaders.search_v.dataset),
            "loader": "stream", "workers": workers}
    return Loaders(loaders.train, loaders.test, loaders.search_t, loaders.search_v, num_classes=classes, info=info)


def _task_set(kind):
    """The registered reader of a segmentation (`voc`) or detection (`coco`) set: it makes the Loaders itself."""

    def load(cfg, *, seed: int, shard, ignore_index: int = 255) -> Loaders:
        if cfg.root is None:
            layout = ("JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt" if kind == "voc"
                      else "annotations/instances_{train,val}*.json with the images in train*/ and val*/")
            raise InputError(f"data.root is None, but data.name={kind} needs the folder holding {layout}")
        if shard is not None and shard[1] > 1 and shard[1] != dist.world_size():
            raise InputError(f"data.name={kind} shards its loaders by the process group; shard={shard} is another")
        if kind == "voc":
            size = cfg.image_size or 320
            scale = {} if cfg.crop_scale is None else {"scale": tuple(cfg.crop_scale)}
            sets = [SegmentationFolder(cfg.root, split, num_classes=cfg.num_classes, ignore_index=ignore_index,
                                       transform=segmentation_transform(split == "train" and cfg.augment, size,
                                                                        **scale))
                    for split in ("train", "val")]
        else:
            sets = [CocoDetection(cfg.root, split, transform=detection_transform(split == "train" and cfg.augment),
                                  empty_boxes=cfg.empty_boxes) for split in ("train", "val")]
        workers = cfg.workers if cfg.workers is not None else default_workers()
        world = dist.world_size()
        loaders = task_loaders(sets[0], sets[1], batch_size=max(1, cfg.batch_size // world),
                               eval_batch_size=max(1, cfg.eval_batch_size // world), workers=workers, seed=seed)
        loaders.info.update(dataset=kind, source=str(cfg.root), input_size=None)
        if kind == "voc":
            loaders.info["image_size"] = size
        return loaders

    load.makes_loaders = True
    return load


register_dataset("voc")(_task_set("voc"))
register_dataset("coco")(_task_set("coco"))
