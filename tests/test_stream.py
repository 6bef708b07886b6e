"""The streaming loader: ImageFolder files decoded by DataLoader workers give the in-memory loader's batches, bitwise,
sharded per process; make_loaders chooses it when asked or when the decoded set would not fit."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from slimrarts.config import ConfigError
from slimrarts.data import DeviceLoader, StreamLoader, index_imagefolder, load_imagefolder, make_loaders
from slimrarts.recipe import DataConfig, load_recipe

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
RESIZE, SIZE = 20, 16
AUG = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop="rrc", image_size=SIZE)


def _write_set(root: Path) -> dict[str, bytes]:
    """train/ (3 classes x 6) and val/ (3 x 3) PNGs of assorted sizes, in a folder; returns the members."""
    g = torch.Generator().manual_seed(0)
    members = {}
    for split, n in (("train", 6), ("val", 3)):
        for c in ("ant", "bee", "cat"):
            for i in range(n):
                image = torch.randint(0, 256, (3, 18 + 3 * i, 27 - 2 * i), generator=g, dtype=torch.uint8)
                members[f"{split}/{c}/{i}.png"] = encode_png(image).numpy().tobytes()
    for rel, data in members.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return members


def _tar(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(f"set/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same set as a folder, an uncompressed tar, two tar shards (train / val) and a .tar.gz."""
    root = tmp_path_factory.mktemp("stream")
    members = _write_set(root / "folder")
    shards = root / "shards"
    shards.mkdir()
    _tar(shards / "part-0.tar", {k: v for k, v in members.items() if k.startswith("train/")})
    _tar(shards / "part-1.tar", {k: v for k, v in members.items() if k.startswith("val/")})
    return {"folder": root / "folder", "tar": _tar(root / "set.tar", members), "shards": shards,
            "targz": _tar(root / "set.tar.gz", members, compress=True)}


def _same(a, b) -> None:
    """The loaders' batches of their current epochs are equal."""
    la, lb = list(a), list(b)
    assert len(la) == len(lb) > 0
    for (xa, ya), (xb, yb) in zip(la, lb, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("kind", ["folder", "tar", "shards"])
def test_streamed_batches_equal_the_in_memory_batches(sources, kind):
    train, test = load_imagefolder(sources["folder"], resize=RESIZE, cache=False)
    files_train, files_test = index_imagefolder(sources[kind])
    assert torch.equal(files_train.labels, train.labels) and torch.equal(files_test.labels, test.labels)
    assert files_train.classes == train.classes
    for shard in (None, (0, 2), (1, 2)):
        memory = DeviceLoader(train, 6, train=True, seed=3, cutout=4, shard=shard, **AUG)
        stream = StreamLoader(files_train, 6, train=True, seed=3, cutout=4, shard=shard, resize=RESIZE,
                              workers=2 if kind == "folder" and shard is None else 0, **AUG)
        for epoch in (0, 1, 0):  # each epoch's draws depend only on (seed, epoch): a resumed run sees the same
            memory.set_epoch(epoch)
            stream.set_epoch(epoch)
            _same(memory, stream)
        _same(DeviceLoader(test, 4, train=False, shard=shard, **AUG),
              StreamLoader(files_test, 4, train=False, shard=shard, resize=RESIZE, workers=0, **AUG))


def test_shards_of_a_global_batch_make_it_up_exactly(sources):
    train, _ = load_imagefolder(sources["folder"], resize=RESIZE, cache=False)
    files, _ = index_imagefolder(sources["tar"])
    whole = list(DeviceLoader(train, 6, train=True, seed=1, **AUG))
    parts = [list(StreamLoader(files, 6, train=True, seed=1, shard=(r, 3), resize=RESIZE, workers=0, **AUG))
             for r in range(3)]
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=SIZE, resize=RESIZE, batch_size=6,
                      eval_batch_size=5, workers=0, **kw)


def test_make_loaders_streams_when_asked_or_when_the_set_does_not_fit(sources):
    memory = make_loaders(_cfg(sources["folder"], loader="memory"), seed=2)
    forced = make_loaders(_cfg(sources["folder"], loader="stream"), seed=2)
    too_big = make_loaders(_cfg(sources["tar"], memory_gb=1e-6), seed=2)
    auto = make_loaders(_cfg(sources["folder"]), seed=2)
    assert memory.info["loader"] == auto.info["loader"] == "memory"
    assert forced.info["loader"] == too_big.info["loader"] == "stream"
    assert isinstance(forced.train, StreamLoader) and isinstance(auto.train, DeviceLoader)
    for name in ("train", "test", "search_t", "search_v"):
        for other in (forced, too_big):
            getattr(memory, name).set_epoch(0)
            _same(getattr(memory, name), getattr(other, name))
    shards = make_loaders(_cfg(sources["shards"], limit_per_class=4), seed=2)  # only the streaming path reads shards
    assert shards.info["loader"] == "stream" and shards.info["train"] == 12


def test_streaming_refuses_what_it_cannot_read(sources):
    with pytest.raises(ValueError, match="decompress"):
        make_loaders(_cfg(sources["targz"], loader="stream"))
    assert make_loaders(_cfg(sources["targz"])).info["loader"] == "memory"  # auto: a .tar.gz is read into memory
    with pytest.raises(ConfigError, match="data.loader=stream"):
        load_recipe({"data": {"name": "cifar10", "loader": "stream"}})
    with pytest.raises(ValueError, match="workers"):
        StreamLoader(index_imagefolder(sources["folder"])[0], 6, train=True, resize=RESIZE, workers=-1, **AUG)
