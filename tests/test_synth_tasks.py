"""benchmarks/synth_tasks.py: the CIFAR-made segmentation/detection set is what its docstring says, and the
library's own readers take it."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from slimrarts.data import CocoDetection, SegmentationFolder

SPEC = importlib.util.spec_from_file_location(
    "synth_tasks", Path(__file__).resolve().parents[1] / "benchmarks" / "synth_tasks.py")
synth = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(synth)

CLASSES = ("ant", "bee", "cat")
SIZE = 64


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Training images all red, test images all blue (so a canvas shows which split it was drawn from)."""
    path = tmp_path_factory.mktemp("cifar") / "tiny.tar.gz"
    g = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, channel in (("train", 0), ("test", 2)):
            for c, name in enumerate(CLASSES):
                for i in range(4):
                    img = torch.randint(0, 30, (3, 32, 32), generator=g, dtype=torch.uint8)
                    img[channel] = 180 + 20 * c
                    raw = torchvision.io.encode_png(img).numpy().tobytes()
                    info = tarfile.TarInfo(f"{split}/{name}/{i}.png")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(scope="module")
def built(archive, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, synth.build(archive, out, size=SIZE, train=40, test=20, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask(root: Path, stem: str) -> np.ndarray:
    from PIL import Image

    with Image.open(root / "voc" / "SegmentationClass" / f"{stem}.png") as im:
        assert im.mode == "P"
        return np.asarray(im)


def test_the_readers_take_both_layouts_with_the_recorded_counts(built):
    out, record = built
    seg = SegmentationFolder(out / "voc", "train")
    det = CocoDetection(out / "coco", "val")
    assert seg.num_classes == 1 + len(CLASSES) and len(seg) == record["counts"]["train"]["canvases"] == 40
    assert len(det) == 20 and det.num_classes == 1 + len(CLASSES)
    assert sum(len(item[3]) for item in det.items) == record["counts"]["val"]["boxes"] > 0
    image, mask = seg[0]
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)


def test_a_second_build_reuses_the_set_and_another_setting_is_refused(built, archive):
    out, record = built
    before = _files(out)
    assert synth.build(archive, out, size=SIZE, train=40, test=20, seed=3) == record
    assert _files(out) == before
    with pytest.raises(FileExistsError, match="another folder"):
        synth.build(archive, out, size=SIZE, train=40, test=20, seed=4)
    assert _files(out) == before


def test_the_build_is_bitwise_reproducible_and_follows_the_seed(built, archive, tmp_path):
    out, _ = built
    again = synth.build(archive, tmp_path / "again", size=SIZE, train=40, test=20, seed=3)
    assert _files(tmp_path / "again") == _files(out) and again["counts"] == built[1]["counts"]
    synth.build(archive, tmp_path / "other", size=SIZE, train=40, test=20, seed=4)
    assert _files(tmp_path / "other")["voc/JPEGImages/train_00000.jpg"] != _files(out)[
        "voc/JPEGImages/train_00000.jpg"]


def test_training_canvases_come_from_training_images_only(built):
    """Objects keep their colour: red ones (CIFAR train) on training canvases, blue ones (test) on test canvases."""
    from PIL import Image

    out, _ = built
    for split, (mine, other) in (("train", (0, 2)), ("val", (2, 0))):
        for i in range(20):
            mask = _mask(out, f"{split}_{i:05d}")
            objects = (mask > 0) & (mask != 255)
            if not objects.any():
                continue
            with Image.open(out / "voc" / "JPEGImages" / f"{split}_{i:05d}.jpg") as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float64)[objects]
            assert rgb[:, mine].mean() > 150 > 60 > rgb[:, other].mean(), (split, i)


def test_masks_hold_classes_and_an_ignored_band_at_every_border(built):
    out, record = built
    empty = 0
    for split in ("train", "val"):
        for i in range(record["counts"][split]["canvases"]):
            mask = _mask(out, f"{split}_{i:05d}")
            assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3, 255}
            for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
                touching = (a != 255) & (b != 255)
                assert (a[touching] == b[touching]).all()  # no two labels meet without the ignored band between
            empty += not (mask > 0).any()
    assert empty == record["counts"]["train"]["empty"] + record["counts"]["val"]["empty"]
    assert empty < 0.2 * 60


def test_boxes_bound_visible_pixels_of_their_class_and_small_ones_are_dropped(built):
    out, _ = built
    ann = json.loads((out / "coco" / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in ann["categories"]] == [1, 2, 3]
    assert [c["name"] for c in ann["categories"]] == list(CLASSES)
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        assert min(w, h) >= 0.1 * SIZE and x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
        mask = _mask(out, f"train_{a['image_id'] - 1:05d}")[y:y + h, x:x + w]
        mine = (mask == a["category_id"]) | (mask == 255)
        assert (mask == a["category_id"]).any()
        for edge in (mine[0], mine[-1], mine[:, 0], mine[:, -1]):  # tight: each side touches the object
            assert edge.any()


def test_bad_arguments_are_named_before_any_work(archive, tmp_path):
    with pytest.raises(ValueError, match="size must be an integer >= 32"):
        synth.build(archive, tmp_path / "a", size=16)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        synth.build(tmp_path / "missing.tar.gz", tmp_path / "b")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a set this script built"):
        synth.build(archive, tmp_path / "mine", size=SIZE, train=2, test=2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_box_is_tight_on_the_visible_pixels_and_hidden_or_small_objects_get_none():
    owner = np.full((100, 100), -1)
    owner[10:40, 20:60] = 0  # 30 x 40, then half hidden by paste 1 -> box of what is left
    owner[25:40, 20:60] = 1
    owner[50:90, 50:58] = 2  # 8 px wide: under 10% of the side
    owner[60:90, 0:30] = 3  # then mostly hidden by paste 4 (20% left)
    owner[66:90, 0:30] = 4
    covered = [30 * 40, 15 * 40, 40 * 8, 30 * 30, 24 * 30]
    boxes = synth._boxes(owner, covered, [5, 6, 7, 8, 9])
    assert boxes == [([20, 10, 40, 15], 5), ([20, 25, 40, 15], 6), ([0, 66, 30, 24], 9)]
