"""Tests of slimrarts.data: CIFAR sources, the cache, the device loader (with cutout) and index splits."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.io import encode_png

from slimrarts.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DeviceLoader,
    ImageSet,
    augment_batch,
    cutout_batch,
    default_cache_dir,
    limit_per_class,
    load_cifar,
    split_halves,
    stats_for,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
_REAL = os.environ.get("SLIMRARTS_TEST_ARCHIVE") or os.environ.get("SLIMRARTS_DATA") or ""
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


# ---------------------------------------------------------------------------------------------------------------
# Tiny fake CIFAR written in every supported form from the same pixels.

def _images(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes * per_class, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images, torch.arange(num_classes).repeat_interleave(per_class)


def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_pickles(root: Path, name: str, classes, train, test) -> Path:
    """torchvision's on-disk format: dicts of uint8 'data' [N, 3072] (R, G, B planes) and a list of labels."""
    def batch(images, labels, label_key, byte_keys=False):
        d = {"batch_label": "fake", "data": images.reshape(len(images), -1).numpy(), label_key: labels.tolist()}
        return {k.encode(): v for k, v in d.items()} if byte_keys else d

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, chunk in enumerate(torch.arange(len(train[0])).chunk(5), start=1):
            _pickle(folder / f"data_batch_{i}", batch(train[0][chunk], train[1][chunk], "labels"))
        _pickle(folder / "test_batch", batch(*test, "labels", byte_keys=True))  # keys as a Python 3 pickler writes
        _pickle(folder / "batches.meta", {"label_names": list(classes), "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _pickle(folder / "train", batch(*train, "fine_labels"))
        _pickle(folder / "test", batch(*test, "fine_labels"))
        _pickle(folder / "meta", {"fine_label_names": list(classes), "coarse_label_names": ["x"]})
    return folder


def _png_members(classes, train, test) -> dict[str, bytes]:
    members = {}
    for split, (images, labels) in (("train", train), ("test", test)):
        counts = [0] * len(classes)
        for image, label in zip(images, labels.tolist(), strict=True):
            members[f"{split}/{classes[label]}/{counts[label]:04d}.png"] = encode_png(image).numpy().tobytes()
            counts[label] += 1
    return members


def _write_folder(root: Path, members: dict[str, bytes]) -> Path:
    for rel, data in members.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _write_tar(path: Path, members: dict[str, bytes], top: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for rel, data in reversed(list(members.items())):  # any member order must give the same result
            info = tarfile.TarInfo(top + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny CIFAR-10 and CIFAR-100 in every form, with the pixels and labels they must load as."""
    root = tmp_path_factory.mktemp("tiny")
    c10 = CIFAR10_CLASSES
    train10, test10 = _images(10, TRAIN_PER_CLASS, 0), _images(10, TEST_PER_CLASS, 1)
    members10 = _png_members(c10, train10, test10)
    c100 = tuple(f"class{i:03d}" for i in range(100))
    train100, test100 = _images(100, 1, 2), _images(100, 1, 3)
    members100 = _png_members(c100, train100, test100)
    (root / "mixed").mkdir()
    return {
        "c10": (c10, train10, test10), "c100": (c100, train100, test100),
        "pickle10": _write_pickles(root / "tv10", "cifar10", c10, train10, test10).parent,
        "pickle100": _write_pickles(root / "tv100", "cifar100", c100, train100, test100),
        "folder10": _write_folder(root / "folder10", members10),
        "targz10": _write_tar(root / "cifar10-png.tar.gz", members10, top="cifar10/"),
        "tar10": _write_tar(root / "plain.tar", members10),
        "tar100": _write_tar(root / "c100.tgz", members100, top="x/"),
        "mixed": root / "mixed",
        "mixed10": _write_tar(root / "mixed" / "cifar-10-png.tar", members10),
        "mixed100": _write_tar(root / "mixed" / "cifar100-png.tar", members100),
    }


def _assert_matches(data: ImageSet, classes, expected) -> None:
    assert data.classes == tuple(classes)
    assert torch.equal(data.images, expected[0])
    assert torch.equal(data.labels, expected[1])
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous() and data.labels.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------
# Sources

@pytest.mark.parametrize("form", ["pickle10", "folder10", "targz10", "tar10", "mixed"])
def test_cifar10_sources_agree(tiny, form):
    classes, train, test = tiny["c10"]
    tr, te = load_cifar("cifar10", tiny[form])
    _assert_matches(tr, classes, train)
    _assert_matches(te, classes, test)
    assert tr.num_classes == 10 and len(tr) == 10 * TRAIN_PER_CLASS and len(te) == 10 * TEST_PER_CLASS


@pytest.mark.parametrize("form", ["pickle100", "tar100", "mixed"])
def test_cifar100_sources_agree(tiny, form):
    classes, train, test = tiny["c100"]
    tr, te = load_cifar("cifar100", tiny[form])
    _assert_matches(tr, classes, train)
    _assert_matches(te, classes, test)


def test_folder_of_sources_picks_by_name(tiny):
    """"cifar10" is a prefix of "cifar100": each name must find its own archive."""
    assert "cifar-10-png.tar" in load_cifar("cifar10", tiny["mixed"])[0].source
    assert "cifar100-png.tar" in load_cifar("cifar100", tiny["mixed"])[0].source
    with pytest.raises(FileNotFoundError, match="torchvision cifar100 folder, not cifar10"):
        load_cifar("cifar10", tiny["pickle100"])


def test_pickle_archive_is_read(tiny, tmp_path):
    folder = tiny["pickle10"] / "cifar-10-batches-py"
    members = {f"cifar-10-batches-py/{f.name}": f.read_bytes() for f in folder.iterdir()}
    tr, te = load_cifar("cifar10", _write_tar(tmp_path / "cifar-10-python.tar.gz", members))
    _assert_matches(te, tiny["c10"][0], tiny["c10"][2])


def test_wrong_classes_are_refused(tiny, tmp_path):
    members = {k: v for k, v in _png_members(*tiny["c10"]).items() if "/truck/" not in k}
    with pytest.raises(ValueError, match="9 classes, CIFAR-10 has 10"):
        load_cifar("cifar10", _write_folder(tmp_path / "nine", members), cache=False)
    renamed = {k.replace("/truck/", "/lorry/"): v for k, v in _png_members(*tiny["c10"]).items()}
    with pytest.raises(ValueError, match="expected the CIFAR-10 classes"):
        load_cifar("cifar10", _write_folder(tmp_path / "renamed", renamed), cache=False)
    test_less = {k: v for k, v in _png_members(*tiny["c10"]).items() if not k.startswith("test/truck/")}
    with pytest.raises(ValueError, match=r"only in train: \['truck'\]"):
        load_cifar("cifar10", _write_tar(tmp_path / "t.tar", test_less), cache=False)


def test_bad_archives_are_refused(tmp_path, tiny):
    members = _png_members(*tiny["c10"])
    two_roots = {("a/" if i % 2 else "b/") + k: v for i, (k, v) in enumerate(members.items())}
    with pytest.raises(ValueError, match="several folders"):
        load_cifar("cifar10", _write_tar(tmp_path / "two.tar", two_roots), cache=False)
    with pytest.raises(ValueError, match="neither"):
        load_cifar("cifar10", _write_tar(tmp_path / "junk.tar", {"readme.txt": b"hi"}), cache=False)
    broken = dict(members, **{"train/cat/0000.png": b"not a png"})
    with pytest.raises(ValueError, match="cannot decode train/cat/0000.png"):
        load_cifar("cifar10", _write_tar(tmp_path / "broken.tar", broken), cache=False)
    (tmp_path / "not.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the archive"):
        load_cifar("cifar10", tmp_path / "not.tar.gz", cache=False)


def test_pickles_with_code_are_refused(tiny, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in (tiny["pickle10"] / "cifar-10-batches-py").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load posix.getcwd"):
        load_cifar("cifar10", tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="'cifar10', 'cifar100'.*'mnist'"):
        load_cifar("mnist")
    with pytest.raises(TypeError, match="download must be a bool"):
        load_cifar("cifar10", download="no")
    with pytest.raises(ValueError, match="'svhn'"):
        stats_for("svhn")
    assert stats_for("CIFAR100") == (CIFAR100_MEAN, CIFAR100_STD)


# ---------------------------------------------------------------------------------------------------------------
# Resolution and cache

def test_data_env_is_used(tiny, monkeypatch):
    monkeypatch.setenv("SLIMRARTS_DATA", str(tiny["targz10"]))
    tr, _ = load_cifar(download=False)
    _assert_matches(tr, tiny["c10"][0], tiny["c10"][1])


def test_cache_folder_is_searched(tiny, monkeypatch):
    monkeypatch.setenv("SLIMRARTS_CACHE", str(tiny["pickle10"]))
    assert default_cache_dir() == tiny["pickle10"]
    _assert_matches(load_cifar(download=False)[0], tiny["c10"][0], tiny["c10"][1])


def test_not_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMRARTS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        load_cifar("cifar10", download=False)
    message = str(info.value)
    for part in ("$SLIMRARTS_DATA", "nowhere does not exist", str(tmp_path / "cache"), "download=False",
                 "pass root=", "set $SLIMRARTS_DATA"):
        assert part in message
    with pytest.raises(FileNotFoundError, match="explicit root is the only place"):
        load_cifar("cifar10", tmp_path)


def test_download_goes_to_the_cache_folder(tiny, tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, train, download):
        calls.append(root)
        _write_pickles(Path(root), "cifar10", *tiny["c10"])

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    tr, _ = load_cifar()
    assert calls == [str(tmp_path / "cache")] and "cifar-10-batches-py" in tr.source
    load_cifar()
    assert len(calls) == 1  # found in the cache folder the second time

    def offline(root, train, download):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(FileNotFoundError, match=r"download into .*: failed \(RuntimeError: no network\)"):
        load_cifar("cifar100")


def test_cache_is_written_and_read(tiny, tmp_path):
    tr, te = load_cifar("cifar10", tiny["targz10"])
    files = list((tmp_path / "cache").glob("cifar10-archive-*.pt"))
    assert len(files) == 1
    blob = torch.load(files[0], weights_only=True)
    assert torch.equal(blob["train_images"], tr.images) and blob["classes"] == list(CIFAR10_CLASSES)
    tr2, te2 = load_cifar("cifar10", tiny["targz10"])
    assert torch.equal(tr2.images, tr.images) and torch.equal(te2.labels, te.labels)
    # The cache is what is read: a changed cached tensor shows up (the key still matches the source).
    blob["test_labels"] = blob["test_labels"].flip(0)
    torch.save(blob, files[0])
    assert torch.equal(load_cifar("cifar10", tiny["targz10"])[1].labels, te.labels.flip(0))
    assert torch.equal(load_cifar("cifar10", tiny["targz10"], cache=False)[1].labels, te.labels)
    # A changed source gets a new key; nothing is left half-written.
    os.utime(tiny["targz10"], ns=(time.time_ns(), time.time_ns() + 10**9))
    load_cifar("cifar10", tiny["targz10"])
    assert len(list((tmp_path / "cache").glob("cifar10-archive-*.pt"))) == 2
    assert not list((tmp_path / "cache").glob(".*tmp"))


def test_folder_cache_key_follows_files(tiny, tmp_path):
    folder = _write_folder(tmp_path / "f", _png_members(*tiny["c10"]))
    load_cifar("cifar10", folder)
    (folder / "train" / "cat" / "0000.png").write_bytes((folder / "train" / "cat" / "0001.png").read_bytes())
    tr, _ = load_cifar("cifar10", folder)
    cat = CIFAR10_CLASSES.index("cat") * TRAIN_PER_CLASS
    assert torch.equal(tr.images[cat], tr.images[cat + 1])
    assert len(list((tmp_path / "cache").glob("cifar10-folder-*.pt"))) == 2


def test_no_cache_writes_nothing(tiny, tmp_path):
    load_cifar("cifar10", tiny["tar10"], cache=False)
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------
# ImageSet

def test_imageset_checks_and_subset():
    images, labels = _images(4, 2, 0)
    data = ImageSet(images, labels, ["a", "b", "c", "d"])
    assert data.classes == ("a", "b", "c", "d") and len(data) == 8 and data.num_classes == 4
    sub = data.subset([7, 0])
    assert torch.equal(sub.images, images[[7, 0]]) and sub.labels.tolist() == [3, 0]
    assert "n=8" in repr(data)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        data.subset([8])
    with pytest.raises(TypeError, match="uint8"):
        ImageSet(images.float(), labels, ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ImageSet(images, labels, ("a", "b", "c"))
    with pytest.raises(ValueError, match="one label per image"):
        ImageSet(images, labels[:-1], ("a", "b", "c", "d"))


# ---------------------------------------------------------------------------------------------------------------
# Loader

def _normalise(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


@pytest.fixture
def data() -> ImageSet:
    images, labels = _images(5, 7, 4)
    return ImageSet(images, labels, tuple("abcde"))


def test_eval_loader_is_the_normalised_images_in_order(data):
    loader = DeviceLoader(data, 8, train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and [len(y) for _, y in batches] == [8, 8, 8, 8, 3]
    x = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(x, _normalise(data.images), rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)
    assert x.dtype == torch.float32 and loader.num_samples == 35 and loader.num_classes == 5
    assert loader.classes == tuple("abcde") and loader.device == torch.device("cpu") and loader.batch_size == 8


def test_loader_options(data):
    loader = DeviceLoader(data, 4, train=False, indices=torch.tensor([3, 1, 4]), mean=CIFAR100_MEAN,
                          std=CIFAR100_STD, channels_last=True, dtype=torch.float64)
    (x, y), = list(loader)
    assert x.dtype == torch.float64 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), _normalise(data.images[[3, 1, 4]], CIFAR100_MEAN, CIFAR100_STD))
    assert y.tolist() == data.labels[[3, 1, 4]].tolist()
    train = DeviceLoader(data, 8, train=True)
    assert len(train) == 4 and all(len(y) == 8 for _, y in train)  # drop_last follows train
    assert len(DeviceLoader(data, 8, train=True, drop_last=False)) == 5


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": 64}, ValueError, "35 samples make no batch"),
    ({"std": (1.0, 0.0, 1.0)}, ValueError, "std must be > 0"),
    ({"mean": (0.5, 0.5)}, ValueError, "mean must be 3 finite numbers"),
    ({"dtype": torch.int32}, TypeError, "dtype must be a floating"),
    ({"augment": "yes"}, TypeError, "augment must be a bool or None"),
    ({"indices": [0, 35]}, ValueError, r"indices must lie in \[0, 35\)"),
])
def test_loader_bad_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        DeviceLoader(data, **{"batch_size": 8, "train": True, **kwargs})


def _candidates(image: torch.Tensor, pad: int) -> torch.Tensor:
    padded = F.pad(image, (pad,) * 4)
    h, w = image.shape[1:]
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return torch.stack(crops + [c.flip(2) for c in crops])


def test_augmented_sample_is_a_padded_crop_maybe_flipped(data):
    loader = DeviceLoader(data, 16, train=True, shuffle=False, drop_last=False)
    x = torch.cat([x for x, _ in loader])
    assert not torch.allclose(x, _normalise(data.images))
    seen = set()
    for i in range(0, 35, 3):
        distances = (_normalise(_candidates(data.images[i], 4)) - x[i]).abs().flatten(1).amax(1)
        assert distances.min() < 1e-5, f"sample {i} is no crop or flip of its input"
        seen.add(int(distances.argmin()))
    assert len(seen) > 3  # offsets and flips vary


def test_augment_batch_matches_reference():
    images, _ = _images(2, 3, 5)
    offsets, flips = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [0, 8], [7, 1]]), torch.tensor([0, 1, 1, 0, 1, 0])
    out = augment_batch(images, offsets, flips.bool(), 4)
    for b in range(6):
        expected = _candidates(images[b], 4)[int(offsets[b, 0]) * 9 + int(offsets[b, 1]) + 81 * int(flips[b])]
        assert torch.equal(out[b], expected)
    assert torch.equal(augment_batch(images, torch.zeros(6, 2, dtype=torch.long), torch.zeros(6).bool(), 0), images)



@pytest.mark.parametrize("crop", [{}, {"crop": "rrc", "image_size": 24, "mean": (0.5,) * 3, "std": (0.25,) * 3}])
@pytest.mark.parametrize("size", [8, 5])
def test_cutout_zeroes_one_square_per_sample(data, crop, size):
    common = dict(train=True, drop_last=False, seed=7, **crop)
    cut = torch.cat([x for x, _ in DeviceLoader(data, 16, cutout=size, **common)])
    full = torch.cat([x for x, _ in DeviceLoader(data, 16, **common)])  # cutout draws come after all others
    side = cut.shape[-1]
    whole = 0
    for i in range(len(cut)):
        changed = (cut[i] != full[i]).any(0)  # [H, W]; no uncut value is exactly 0 here
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        assert len(rows) and torch.equal(changed, changed.any(1)[:, None] & changed.any(0)[None, :])  # a rectangle
        assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1))  # in one piece
        assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[-1]) + 1))
        for idx in (rows, cols):  # `size` long unless clipped at a border
            assert len(idx) == size or (len(idx) < size and (int(idx[0]) == 0 or int(idx[-1]) == side - 1))
        whole += len(rows) == len(cols) == size
        assert bool((cut[i][:, changed] == 0).all()) and torch.equal(cut[i][:, ~changed], full[i][:, ~changed])
    assert whole > 5


def test_cutout_batch_matches_reference():
    x = torch.randn(4, 3, 10, 12)
    centres = torch.tensor([[5, 6], [0, 0], [9, 11], [2, 10]])
    out = cutout_batch(x, centres, 4)
    for b, (r, c) in enumerate(centres.tolist()):
        expected = x[b].clone()
        expected[:, max(r - 2, 0): r + 2, max(c - 2, 0): c + 2] = 0
        assert torch.equal(out[b], expected)
    assert torch.equal(cutout_batch(x, centres, 0), x)

def test_epochs_are_reproducible_and_differ(data):
    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a = DeviceLoader(data, 8, train=True, drop_last=False, seed=3)
    b = DeviceLoader(data, 8, train=True, drop_last=False, seed=3)
    first, again, other = epoch(a, 2), epoch(b, 2), epoch(a, 5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other, strict=True))
    seeded = epoch(DeviceLoader(data, 8, train=True, drop_last=False, seed=4), 2)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, seeded, strict=True))
    # Each iter() advances the epoch; set_epoch makes an epoch's batches replayable.
    assert a.epoch == 6
    b.set_epoch(0)
    list(b)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(epoch(b, 1), epoch(a, 1), strict=True))


def test_shuffle_covers_every_sample_once(data):
    loader = DeviceLoader(data, 8, train=True, augment=False, drop_last=False)
    orders = []
    for e in range(2):
        loader.set_epoch(e)
        x = torch.cat([x for x, _ in loader])
        reference = _normalise(data.images)
        order = [int((reference - xi).abs().flatten(1).amax(1).argmin()) for xi in x]
        assert sorted(order) == list(range(35))
        orders.append(order)
    assert orders[0] != orders[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_do_not_sync(data):
    loader = DeviceLoader(data, 4, train=True, device="cuda", channels_last=True)
    batches = iter(loader)
    next(batches)  # the epoch's order and draws move to the device here, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [(x.shape, y.device) for x, y in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == len(loader) - 1 and rest[0][1].type == "cuda"


# ---------------------------------------------------------------------------------------------------------------
# Splits

def test_split_halves():
    labels = torch.arange(7).repeat_interleave(torch.tensor([5, 6, 7, 1, 9, 2, 3]))
    first, second = split_halves(labels, seed=1)
    assert torch.equal(torch.sort(torch.cat([first, second])).values, torch.arange(len(labels)))
    assert torch.equal(first, first.sort().values) and torch.equal(second, second.sort().values)
    per_class = torch.bincount(labels[first], minlength=7) - torch.bincount(labels[second], minlength=7)
    assert per_class.abs().max() <= 1 and abs(len(first) - len(second)) <= 1
    again = split_halves(labels, seed=1)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    assert not torch.equal(split_halves(labels, seed=2)[0], first)
    plain = split_halves(labels, seed=1, stratified=False)
    assert len(plain[0]) == 17 and len(plain[1]) == 16 and not set(plain[0].tolist()) & set(plain[1].tolist())
    with pytest.raises(TypeError, match="1-D integer tensor"):
        split_halves(labels.float())
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        split_halves(labels, seed=-1)


@pytest.mark.parametrize("targets", [True, False], ids=["stratified", "no-targets"])
def test_a_plain_dataloader_is_split_into_disjoint_halves(targets):
    """`as_loaders((train, test))` serves D_t and D_v from two disjoint halves of the training DataLoader's dataset
    that cover it (stratified when the dataset has `targets`), with its batch size, reproducibly for a seed."""
    from slimrarts.data import as_loaders

    labels = torch.arange(5).repeat_interleave(torch.tensor([7, 4, 9, 1, 6]))
    ids = torch.arange(len(labels))
    ds = torch.utils.data.TensorDataset(ids, labels)
    if targets:
        ds.targets = labels
    train = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, drop_last=False)
    test = torch.utils.data.DataLoader(ds, batch_size=8)
    loaders = as_loaders((train, test), seed=3)
    assert loaders.train is train and loaders.test is test
    seen = []
    for half in (loaders.search_t, loaders.search_v):
        assert isinstance(half, torch.utils.data.DataLoader) and half.batch_size == 4
        batches = list(half)
        assert all(len(b[0]) <= 4 for b in batches)
        got = torch.cat([b[0] for b in batches])
        assert len(set(got.tolist())) == len(got)
        assert torch.equal(torch.cat([b[1] for b in batches]), labels[got])  # (sample, label) pairs intact
        seen.append(set(got.tolist()))
    first, second = seen
    assert not first & second and first | second == set(range(len(labels)))
    assert abs(len(first) - len(second)) <= 1
    if targets:
        per_class = (torch.bincount(labels[sorted(first)], minlength=5)
                     - torch.bincount(labels[sorted(second)], minlength=5))
        assert per_class.abs().max() <= 1
    again = as_loaders((train, test), seed=3)
    assert {int(i) for b in again.search_t for i in b[0]} == first
    assert {int(i) for b in as_loaders((train, test), seed=4).search_t for i in b[0]} != first


def test_limit_per_class():
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2])
    assert limit_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4, 6]
    assert limit_per_class(labels, 9).tolist() == list(range(10))  # a class with fewer keeps them all
    random = limit_per_class(labels, 2, seed=0)
    assert torch.equal(torch.bincount(labels[random]), torch.tensor([2, 2, 2]))
    assert torch.equal(random, limit_per_class(labels, 2, seed=0))
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        limit_per_class(labels, 0)


# ---------------------------------------------------------------------------------------------------------------
# The real data set

@pytest.mark.slow
@pytest.mark.skipif(not Path(_REAL).exists() if _REAL else True,
                    reason="set SLIMRARTS_TEST_ARCHIVE (or SLIMRARTS_DATA) to the real CIFAR-10 data")
def test_real_cifar10():
    train, test = load_cifar("cifar10", _REAL, download=False)
    assert (len(train), len(test)) == (50_000, 10_000) and train.classes == CIFAR10_CLASSES
    assert torch.bincount(train.labels).tolist() == [5_000] * 10
    assert torch.bincount(test.labels).tolist() == [1_000] * 10
    assert tuple(train.images.shape[1:]) == (3, 32, 32)
    mean = train.images.double().mean((0, 2, 3)) / 255
    torch.testing.assert_close(mean, torch.tensor(CIFAR10_MEAN, dtype=torch.float64), atol=2e-3, rtol=0)


def test_a_registered_data_set_is_a_recipe_value_and_what_make_loaders_reads(tiny_sets):
    """`data.name`'s allowed values come from the registry: a new set is accepted by the recipe and loaded by
    make_loaders; an unknown name is refused naming the registered ones."""
    from slimrarts.data import list_datasets, make_loaders, register_dataset, registry
    from slimrarts.recipe import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="data.name.*cifar10, cifar100, imagefolder"):
        load_recipe({"data": {"name": "tiny-test"}})
    try:
        register_dataset("tiny-test")(lambda cfg: (*tiny_sets, {"mean": (0.5,) * 3, "std": (0.25,) * 3}, {}))
        assert "tiny-test" in list_datasets()
        recipe = load_recipe({"data": {"name": "tiny-test", "batch_size": 25, "eval_batch_size": 40}})
        loaders = make_loaders(recipe.data)
        assert loaders.info["dataset"] == "tiny-test" and len(loaders.test) == 2  # 80 test images in batches of 40
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tiny-test")(lambda cfg: None)
    finally:
        registry._REGISTRY.pop("tiny-test", None)
