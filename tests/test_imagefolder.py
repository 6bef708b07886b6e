"""Tests of the imagefolder data kind: reading, resizing and caching, the random-resized-crop loader, make_loaders."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from slimrarts.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceLoader,
    ImageSet,
    default_cache_dir,
    imagefolder_sizes,
    load_imagefolder,
    make_loaders,
    random_resized_boxes,
    resized_crop_batch,
)
from slimrarts.recipe import DataConfig

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
CLASSES = ("ant", "bee", "cat")
SIZES = ((30, 40), (50, 25), (21, 21), (33, 47))  # (height, width) of each class's four images


# ---------------------------------------------------------------------------------------------------------------
# Tiny data sets in ImageFolder layout: RGB, grayscale and RGBA PNGs and a JPEG of odd sizes.

def _rgb(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _encode(i: int, image: torch.Tensor) -> tuple[str, bytes]:
    if i == 1:  # RGBA, which torchvision cannot encode
        rgba = torch.cat([image, torch.full_like(image[:1], 200)]).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgba)).save(buf, "PNG")
        return "png", buf.getvalue()
    if i == 2:
        return "PNG", encode_png(image[:1]).numpy().tobytes()  # grayscale, upper-case suffix
    if i == 3:
        return "jpg", encode_jpeg(image, quality=90).numpy().tobytes()
    return "png", encode_png(image).numpy().tobytes()


def _members(splits=("train", "test"), classes=CLASSES) -> dict[str, bytes]:
    members = {}
    for s, split in enumerate(splits):
        for c, cls in enumerate(classes):
            for i, (h, w) in enumerate(SIZES):
                ext, data = _encode(i, _rgb(h, w, seed=100 * s + 10 * c + i))
                members[f"{split}/{cls}/{i:02d}.{ext}"] = data
    return members


def _folder(root: Path, members: dict[str, bytes]) -> Path:
    for rel, data in members.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _tar(path: Path, members: dict[str, bytes], top: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(f"{top}{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _reference(image: torch.Tensor, resize: int) -> torch.Tensor:
    return TF.center_crop(TF.resize(image, [resize], antialias=True), [resize, resize])


@pytest.fixture
def folder(tmp_path) -> Path:
    return _folder(tmp_path / "tiny", _members())


# ---------------------------------------------------------------------------------------------------------------
# Reading

def test_folder_and_archives_give_identical_tensors(tmp_path, folder):
    sources = [folder, _tar(tmp_path / "tiny.tar", _members()), _tar(tmp_path / "tiny.tar.gz", _members(), "x/")]
    sets = [load_imagefolder(src, resize=20, cache=False) for src in sources]
    for train, test in sets:
        assert train.classes == test.classes == CLASSES
        assert tuple(train.images.shape) == tuple(test.images.shape) == (12, 3, 20, 20)
        assert train.labels.tolist() == test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert torch.equal(train.images, sets[0][0].images) and torch.equal(test.images, sets[0][1].images)
    assert "train/ and test/" in sets[0][0].source


def test_images_are_resized_and_centre_cropped(folder):
    train, _ = load_imagefolder(folder, resize=16, cache=False)
    assert torch.equal(train.images[0], _reference(_rgb(30, 40, seed=0), 16))  # RGB PNG
    assert torch.equal(train.images[1], _reference(_rgb(50, 25, seed=1), 16))  # RGBA PNG: alpha dropped
    gray = _reference(_rgb(21, 21, seed=2)[:1], 16)
    assert torch.equal(train.images[2], gray.expand(3, -1, -1))  # grayscale made RGB


def test_centre_crop_keeps_the_middle(tmp_path):
    stripes = torch.zeros(3, 30, 60, dtype=torch.uint8)  # red, green, blue thirds, left to right
    for k in range(3):
        stripes[k, :, 20 * k: 20 * (k + 1)] = 255
    members = {f"{split}/a/0.png": encode_png(stripes).numpy().tobytes() for split in ("train", "val")}
    train, test = load_imagefolder(_folder(tmp_path, members), resize=10)  # 10 x 20, then the middle 10 x 10
    assert "train/ and val/" in test.source
    assert torch.equal(train.images[0, :, :, 2:8], torch.tensor([0, 255, 0]).view(3, 1, 1).expand(3, 10, 6).byte())


def test_val_is_used_without_test_and_the_single_child_folder_is_found(tmp_path):
    _folder(tmp_path / "holder" / "set", _members(splits=("train", "val")))
    train, test = load_imagefolder(tmp_path / "holder", resize=12, cache=False)
    assert len(train) == len(test) == 12 and "val/" in test.source


def test_mismatched_classes_are_refused(tmp_path):
    members = {**_members(splits=("train",)), **_members(splits=("test",), classes=("ant", "bee", "dog"))}
    match = r"train/ and test/ must have the same classes .*only in train/: \['cat'\], only in test/: \['dog'\]"
    with pytest.raises(ValueError, match=match):
        load_imagefolder(_folder(tmp_path / "f", members), resize=8, cache=False)
    with pytest.raises(ValueError, match=match):
        load_imagefolder(_tar(tmp_path / "t.tar", members), resize=8, cache=False)


def test_bad_sources_and_arguments(tmp_path, folder):
    with pytest.raises(ValueError, match="resize must be an int >= 1, got 0"):
        load_imagefolder(folder, resize=0)
    with pytest.raises(TypeError, match="root must be a path"):
        load_imagefolder(3, resize=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagefolder(tmp_path / "nothing", resize=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no train/ plus test/ or val/ folders"):
        load_imagefolder(tmp_path / "empty", resize=8)
    with pytest.raises(ValueError, match="only under \\['train/'\\]"):
        load_imagefolder(_tar(tmp_path / "half.tar", _members(splits=("train",))), resize=8)
    (folder / "train" / "ant" / "00.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read train/ant/00.png"):
        load_imagefolder(folder, resize=8, cache=False)


def test_cache_is_keyed_by_resize_and_files(folder):
    first, _ = load_imagefolder(folder, resize=12)
    files = sorted(default_cache_dir().glob("imagefolder-folder-*.pt"))
    assert len(files) == 1
    again, _ = load_imagefolder(folder, resize=12)
    assert torch.equal(again.images, first.images) and len(list(default_cache_dir().glob("*.pt"))) == 1
    load_imagefolder(folder, resize=14)
    assert len(list(default_cache_dir().glob("*.pt"))) == 2
    (folder / "train" / "ant" / "00.png").write_bytes(encode_png(torch.zeros(3, 9, 9, dtype=torch.uint8)).numpy())
    changed, _ = load_imagefolder(folder, resize=12)
    assert int(changed.images[0].max()) == 0 and len(list(default_cache_dir().glob("*.pt"))) == 3


# ---------------------------------------------------------------------------------------------------------------
# Random-resized crop

def _normalise(images: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


def _rrc(data: ImageSet, batch_size: int = 4, **kwargs) -> DeviceLoader:
    return DeviceLoader(data, batch_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop="rrc", **kwargs)


def test_boxes_follow_scale_and_ratio():
    boxes = random_resized_boxes(2000, 40, 30, (0.25, 0.5), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all())
    area, ratio = (h * w).double() / 1200, w.double() / h
    assert 0.23 < area.min() and area.max() < 0.53 and 0.7 < ratio.min() and ratio.max() < 1.4  # up to rounding
    assert len(set(map(tuple, boxes.tolist()))) > 500
    wide = random_resized_boxes(3, 10, 100, (0.9, 1.0), torch.Generator().manual_seed(0))  # no box fits
    assert wide.tolist() == [[0, 43, 10, 13]] * 3  # the centred box of the largest allowed ratio, as torchvision
    with pytest.raises(ValueError, match="scale must be"):
        random_resized_boxes(3, 10, 10, (0.5, 1.5), torch.Generator())


def test_resized_crop_matches_torchvision():
    images = torch.rand(3, 3, 30, 40, generator=torch.Generator().manual_seed(0)) * 255
    boxes, flips = torch.tensor([[0, 0, 30, 40], [3, 5, 17, 9], [10, 2, 5, 7]]), torch.tensor([False, True, False])
    for size in (4, 12, 24):
        out = resized_crop_batch(images, boxes, flips, size, dtype=torch.float64)
        for b, (top, left, h, w) in enumerate(boxes.tolist()):
            ref = TF.resized_crop(images[b].double(), top, left, h, w, [size, size], antialias=True)
            torch.testing.assert_close(out[b], ref.flip(2) if flips[b] else ref, rtol=0, atol=1e-9)


def test_train_batches_are_crops_of_the_stored_image():
    colours = torch.tensor([[200, 10, 90], [0, 255, 30], [17, 17, 170], [255, 255, 255], [5, 6, 7]])
    flat = ImageSet(colours.byte().view(5, 3, 1, 1).expand(5, 3, 20, 20).contiguous(), torch.arange(5) % 2, ("a", "b"))
    loader = _rrc(flat, 2, train=True, image_size=8, drop_last=False, shuffle=False)
    for _ in range(3):
        x = torch.cat([x for x, _ in loader])
        assert x.shape == (5, 3, 8, 8)
        torch.testing.assert_close(x, _normalise(colours.view(5, 3, 1, 1)).expand(5, 3, 8, 8), rtol=0, atol=1e-5)
    halves = torch.zeros(8, 3, 20, 20, dtype=torch.uint8)
    halves[..., 10:] = 255  # dark left, bright right
    loader = _rrc(ImageSet(halves, torch.zeros(8, dtype=torch.long), ("a",)), 8, train=True, image_size=6)
    orders = set()
    for _ in range(4):
        (x, _), = list(loader)
        step = x[:, :, :, 1:] - x[:, :, :, :-1]  # left to right: only up (kept) or only down (flipped)
        up, down = (step > 1e-4).flatten(1).any(1), (step < -1e-4).flatten(1).any(1)
        assert not bool((up & down).any())
        torch.testing.assert_close(x, x[:, :, :1].expand_as(x), rtol=0, atol=1e-5)  # every row alike
        orders |= {"up" if u else "down" if d else "flat" for u, d in zip(up.tolist(), down.tolist(), strict=True)}
    assert {"up", "down"} <= orders
    assert float(x.amin()) == pytest.approx(float(_normalise(halves).amin()), abs=1e-5)


def test_eval_batches_are_the_centre_crop():
    data = ImageSet(torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8), torch.arange(5) % 3, CLASSES)
    loader = _rrc(data, 2, train=False, image_size=16)
    x = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(x, _normalise(data.images[:, :, 2:18, 2:18]), rtol=0, atol=1e-5)
    assert loader.sample_shape == (3, 16, 16) and len(loader) == 3
    whole = torch.cat([x for x, _ in _rrc(data, 5, train=False)])  # image_size defaults to the stored side
    torch.testing.assert_close(whole, _normalise(data.images), rtol=0, atol=1e-5)


def test_same_seed_and_epoch_give_the_same_batches():
    data = ImageSet(torch.randint(0, 256, (10, 3, 20, 20), dtype=torch.uint8), torch.arange(10) % 3, CLASSES)

    def epoch(seed: int, e: int) -> list[torch.Tensor]:
        loader = _rrc(data, 4, train=True, image_size=12, seed=seed, crop_scale=(0.3, 0.9))
        loader.set_epoch(e)
        return [x for x, _ in loader]

    first = epoch(1, 3)
    assert len(first) == 2 and all(x.shape == (4, 3, 12, 12) for x in first)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(1, 3), strict=True))
    assert not torch.equal(first[0], epoch(1, 4)[0]) and not torch.equal(first[0], epoch(2, 3)[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"crop": "rrc", "image_size": 21}, r"image_size must be an int in \[1, 20\]"),
    ({"crop": "rrc", "pad": 4}, "pad is used only with crop='pad'"),
    ({"crop": "rrc", "crop_scale": (0.5, 0.2)}, "crop_scale must be"),
    ({"image_size": 16}, "used only with crop='rrc'"),
    ({"crop": "resize"}, r"crop must be one of \['pad', 'rrc'\]"),
    ({"cutout": 4, "augment": False}, "cutout=4 is applied only to augmented batches"),
])
def test_loader_bad_crop_arguments(kwargs, match):
    data = ImageSet(torch.zeros(4, 3, 20, 20, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match=match):
        DeviceLoader(data, 2, train=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# make_loaders

def test_make_loaders_imagefolder(folder):
    cfg = DataConfig(name="imagefolder", root=str(folder), image_size=16, resize=20, batch_size=4, eval_batch_size=5,
                     cutout=6)
    loaders = make_loaders(cfg, seed=0)
    assert loaders.num_classes == 3 and loaders.info["input_size"] == [3, 16, 16]
    assert (loaders.info["image_size"], loaders.info["resize"], loaders.info["train"]) == (16, 20, 12)
    assert loaders.info["search_t"] + loaders.info["search_v"] == 12
    for loader in (loaders.train, loaders.search_t, loaders.search_v):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64 and loader.cutout == 6
    assert loaders.test.cutout == 0 and not loaders.test.augment
    _, test = load_imagefolder(folder, resize=20)
    x = torch.cat([x for x, _ in loaders.test])
    torch.testing.assert_close(x, _normalise(test.images[:, :, 2:18, 2:18]), rtol=0, atol=1e-5)
    limited = make_loaders(DataConfig(name="imagefolder", root=str(folder), image_size=16, resize=20, batch_size=2,
                                      limit_per_class=2, test_limit_per_class=1))
    assert (limited.info["train"], limited.info["test"]) == (6, 3)


def test_make_loaders_cifar_records_input_size(tiny_archive):
    loaders = make_loaders(DataConfig(name="cifar10", root=tiny_archive, batch_size=50, cutout=8))
    assert loaders.info["input_size"] == [3, 32, 32] and "image_size" not in loaders.info
    assert loaders.train.cutout == 8 and loaders.test.cutout == 0 and loaders.train.pad == 4


def test_make_loaders_refuses_what_would_do_nothing(folder):
    with pytest.raises(ValueError, match="data.name=imagefolder needs one"):
        make_loaders(DataConfig(name="imagefolder"))
    with pytest.raises(ValueError, match="data.cutout=8 is applied only to augmented batches"):
        make_loaders(DataConfig(name="imagefolder", root=str(folder), cutout=8, augment=False, resize=20))
    with pytest.raises(ValueError, match="data.image_size=16 is used only by data.name=imagefolder"):
        make_loaders(DataConfig(name="cifar10", root=str(folder), image_size=16))


def test_imagefolder_sizes():
    assert imagefolder_sizes(None, None) == (224, 256)
    assert imagefolder_sizes(16, None) == (16, 18) and imagefolder_sizes(None, 64) == (56, 64)
    with pytest.raises(ValueError, match="data.resize=12 must be >= data.image_size=16"):
        imagefolder_sizes(16, 12)

