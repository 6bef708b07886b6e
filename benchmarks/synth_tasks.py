"""A segmentation and detection set made from CIFAR-10, in VOC and COCO layout (issue 24's benchmark data).

    python benchmarks/synth_tasks.py ../shared/data/cifar10-jpg.tar.gz runs/synth --train 2000 --test 500

No segmentation or detection set can be downloaded on the development machine, so this builds one from the CIFAR-10
archive it has. Each canvas (`--size` px, 160 by default) is a background tiled from CIFAR images made grey and
dimmed (half contrast), with 2-4 CIFAR objects pasted on it, each upscaled to 25-60% of the canvas side (40-96 px at
160), randomly flipped, through a feathered ellipse mask; about 5% of the canvases hold no object. Labels:

- the mask is 1 + the object's CIFAR class where the paste's alpha is at least 0.5 (a later paste covers an
  earlier one), 0 elsewhere, and 255 (ignored) on both sides of every border between two labels (1 px each side);
- a box covers the pixels where an object stayed visible; an object less than 30% visible, or whose visible box is
  under 10% of the canvas side (16 px at 160) in width or height, gets no box (it stays in the mask).

Training canvases are made from CIFAR's training images only and test canvases from its test images only, so no
CIFAR image is in both splits. Everything is drawn from `--seed`; a build is bitwise reproducible. Written under OUT:

    OUT/voc/JPEGImages/<id>.jpg, OUT/voc/SegmentationClass/<id>.png (palette PNG), OUT/voc/classes.txt,
    OUT/voc/ImageSets/Segmentation/{train,val}.txt
    OUT/coco/{train,val}/<id>.jpg, OUT/coco/annotations/instances_{train,val}.json (categories 1..10)
    OUT/synth.json: the arguments, the archive's sha256 and the counts

A second build with the same arguments and archive reuses OUT; OUT holding anything else is refused, never
overwritten. The set is built in a sibling folder and moved into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the drawing changes, so an old set is not reused
SPLITS = (("train", 0), ("val", 1))  # (split name, stream of the seed)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _palette() -> list[int]:
    """VOC's colour map (bit-interleaved), so the masks look as VOC's do in an image viewer."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def _background(rng: np.random.Generator, pool: np.ndarray, size: int) -> np.ndarray:
    """A canvas [size, size, 3] float tiled from random images of `pool` [N, 32, 32, 3], grey, half contrast."""
    tile = pool.shape[1]
    n = -(-size // tile)
    picks = rng.integers(0, len(pool), n * n)
    grid = pool[picks].reshape(n, n, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(n * tile, n * tile, 3)
    grey = grid[:size, :size].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat((0.5 * grey + 64.0)[..., None], 3, axis=2)


def _paste(rng: np.random.Generator, pool: np.ndarray, size: int):
    """One object: (its picture [s, s, 3] float, alpha [s, s], top, left, index into pool)."""
    from PIL import Image

    index = int(rng.integers(0, len(pool)))
    side = int(rng.integers(round(0.25 * size), round(0.6 * size) + 1))
    picture = Image.fromarray(pool[index]).resize((side, side), Image.BILINEAR)
    picture = np.asarray(picture, dtype=np.float64)
    if rng.random() < 0.5:
        picture = picture[:, ::-1]
    ry, rx = rng.uniform(0.75, 1.0, 2) * side / 2  # semi-axes of the ellipse inside the square
    yy, xx = np.mgrid[0:side, 0:side] + 0.5 - side / 2
    radius = np.sqrt((yy / ry) ** 2 + (xx / rx) ** 2)
    alpha = np.clip((1.0 - radius) / 0.15, 0.0, 1.0)  # 1 inside, feathered over the outer 15% of the radius
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    return picture, alpha, top, left, index


def _boxes(owner: np.ndarray, covered: list[int], classes: list[int]) -> list[tuple[list[int], int]]:
    """([x, y, w, h], class) of each paste's visible pixels (`owner` == its index), for pastes at least 30% visible
    (of the `covered` pixels they had when pasted) whose box is at least 10% of the canvas side both ways."""
    boxes = []
    for k, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == k)
        if len(ys) == 0 or len(ys) < 0.3 * covered[k]:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if min(x1 - x0, y1 - y0) < 0.1 * owner.shape[0]:
            continue
        boxes.append(([x0, y0, x1 - x0, y1 - y0], cls))
    return boxes


def _canvas(rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray, size: int):
    """(image uint8 [size, size, 3], mask uint8 [size, size], boxes [(xywh, class)], pool indices used)."""
    image = _background(rng, pool, size)
    mask = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1)  # which paste each pixel shows
    covered = []  # pixels per paste with alpha >= 0.5, before later pastes
    classes = []
    used = []
    count = 0 if rng.random() < 0.05 else int(rng.integers(2, 5))
    for k in range(count):
        picture, alpha, top, left, index = _paste(rng, pool, size)
        side = alpha.shape[0]
        region = (slice(top, top + side), slice(left, left + side))
        image[region] = alpha[..., None] * picture + (1.0 - alpha[..., None]) * image[region]
        solid = alpha >= 0.5
        mask[region][solid] = 1 + int(labels[index])
        owner[region][solid] = k
        covered.append(int(solid.sum()))
        classes.append(int(labels[index]))
        used.append(index)
    boxes = _boxes(owner, covered, classes)
    edge = np.zeros_like(mask, bool)  # both sides of every border between two labels
    down, right = mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    mask[edge] = 255
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, boxes, used


def _write_split(out: Path, split: str, rng: np.random.Generator, pool: np.ndarray, labels: np.ndarray,
                 classes: tuple[str, ...], n: int, size: int) -> dict:
    from PIL import Image

    voc, coco = out / "voc", out / "coco"
    images, annotations, ids, empty = [], [], [], 0
    palette = _palette()
    for i in range(n):
        image, mask, boxes, _ = _canvas(rng, pool, labels, size)
        stem = f"{split}_{i:05d}"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        (voc / "JPEGImages" / f"{stem}.jpg").write_bytes(buf.getvalue())
        (coco / split / f"{stem}.jpg").write_bytes(buf.getvalue())
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{stem}.png")
        ids.append(stem)
        images.append({"id": i + 1, "file_name": f"{stem}.jpg", "width": size, "height": size})
        empty += not (mask > 0).any()
        for box, cls in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    categories = [{"id": c + 1, "name": name, "supercategory": "cifar10"} for c, name in enumerate(classes)]
    (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return {"canvases": n, "empty": empty, "boxes": len(annotations)}


def build(cifar_path, out, *, size: int = 160, train: int = 2000, test: int = 500, seed: int = 0) -> dict:
    """Build the set under `out` from the CIFAR archive (or folder) `cifar_path`; returns synth.json's content.
    Reuses `out` when it already holds this very build; refuses an `out` holding anything else."""
    from slimrarts.data.imagefolder import load_imagefolder

    cifar_path, out = Path(cifar_path), Path(out)
    for key, value, least in (("size", size, 32), ("train", train, 1), ("test", test, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"synth_tasks: {key} must be an integer >= {least}, got {value!r}")
    if not cifar_path.exists():
        raise FileNotFoundError(f"synth_tasks: no CIFAR-10 at {str(cifar_path)!r} (an archive such as "
                                "cifar10-jpg.tar.gz, or an ImageFolder folder)")
    digest = _sha256(cifar_path) if cifar_path.is_file() else None
    args = {"format": FORMAT, "size": size, "train": train, "test": test, "seed": seed,
            "cifar": cifar_path.name, "cifar_sha256": digest}
    record = out / "synth.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("args") == args:
            return old
        raise FileExistsError(f"synth_tasks: {str(out)!r} holds a set built with {old.get('args')}, not {args}; "
                              "remove it or give another folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"synth_tasks: {str(out)!r} exists and is not a set this script built "
                              "(no synth.json); give an empty or new folder")
    train_set, test_set = load_imagefolder(cifar_path, resize=32)
    if train_set.classes != test_set.classes:
        raise ValueError(f"synth_tasks: the train and test classes of {str(cifar_path)!r} differ")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for sub in ("voc/JPEGImages", "voc/SegmentationClass", "voc/ImageSets/Segmentation", "coco/annotations",
                    "coco/train", "coco/val"):
            (work / sub).mkdir(parents=True)
        (work / "voc" / "classes.txt").write_text("\n".join(("background", *train_set.classes)) + "\n")
        counts = {}
        for (split, stream), source, n in zip(SPLITS, (train_set, test_set), (train, test), strict=True):
            pool = source.images.permute(0, 2, 3, 1).contiguous().numpy()
            rng = np.random.default_rng([seed, stream])
            counts[split] = _write_split(work, split, rng, pool, source.labels.numpy(), train_set.classes, n, size)
        payload = {"args": args, "classes": list(train_set.classes), "counts": counts,
                   "source_images": {"train": len(train_set), "val": len(test_set)}}
        (work / "synth.json").write_text(json.dumps(payload, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return payload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cifar", help="the CIFAR-10 archive (cifar10-jpg.tar.gz) or an ImageFolder folder of it")
    ap.add_argument("out", help="the folder to write (new, empty, or an earlier build with the same arguments)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    payload = build(args.cifar, args.out, size=args.size, train=args.train, test=args.test, seed=args.seed)
    print(json.dumps(payload["counts"]), file=sys.stdout)


if __name__ == "__main__":
    main()
