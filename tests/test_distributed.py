"""Runs over several processes: 2 CPU processes (gloo, launched by torchrun) give the single-process result with the
same global batch and seed; a crash of one rank stops the run and --resume finishes it; the helpers of
`slimrarts.engine.dist`, the loaders' shards and the settings several processes refuse.

For a net without batch statistics the reference is the plain single-process run. For a BN net it is a single
process whose batch norms normalise each half of the batch on their own (`dist_worker.SplitBatchNorm2d`), as the
two processes each normalise their half. The test nets use SiLU: with ReLU, rounding-level differences between two
runs flip an activation at a kink now and then and change a gradient by a finite step (seen with tiny_resnet), so
no tolerance would hold over many steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch
import torch.distributed as tdist
import torch.nn as nn
import yaml
from conftest import flat_tensors
from torchvision.io import encode_png

from slimrarts.commands.width import prune_recipe
from slimrarts.config import ConfigError
from slimrarts.data import CIFAR10_CLASSES, DeviceLoader, make_loaders
from slimrarts.engine import dist
from slimrarts.models import create_model
from slimrarts.preflight import check_processes
from slimrarts.recipe import DataConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-5  # fp32: the ranks' half-batch gradients are averaged, the reference takes the whole batch's


# ---- running the processes ----------------------------------------------------------------------------------------

def _torchrun(args: list[str], cwd: Path, env: dict | None = None, nproc: int = 2,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc tests/dist_worker.py args` with this checkout's slimrarts."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
           *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _recipe(model: str, method: str, root: str, **data) -> dict:
    """A few iterations: 200 training images, global batch 20 (5 per half-epoch), 2 search + 1 fine-tune epochs."""
    return {"name": f"{model}-{method}", "seed": 0, "device": "cpu",
            "data": {"name": "cifar10", "root": root, "batch_size": 20, "eval_batch_size": 40, **data},
            "model": {"name": model},
            "search": {"method": method, "epochs": 2, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
            "finetune": {"epochs": 1, "optim": {"lr": 0.05}},
            "prune": {"ratio": 0.4}, "report": {"latency": False}}


def _reference(recipe: dict, out: Path) -> None:
    """The single-process run, in this process."""
    dist_worker.register()
    prune_recipe(load_recipe(recipe), out, progress=False)


_flat = flat_tensors


def _learned(run: Path) -> dict[str, torch.Tensor]:
    """w, y and α at the end of the search (or the sparsity-trained model of a baseline) and the slim weights."""
    search = torch.load(run / "checkpoints" / "search.pt", weights_only=True)
    parts = {k: search[k] for k in ("w", "y", "arch", "model") if k in search}
    parts["slim"] = torch.load(run / "slim.pt", weights_only=True)["state_dict"]
    return _flat(parts)


def _assert_same_run(ref: Path, run: Path, tol: float = TOL) -> None:
    a, b = _learned(ref), _learned(run)
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert x.shape == y.shape, key
        if x.is_floating_point():
            assert (x - y).abs().max().item() <= tol, (key, (x - y).abs().max().item())
        else:
            assert torch.equal(x, y), key
    assert json.loads((ref / "width_spec.json").read_text())["groups"] == \
        json.loads((run / "width_spec.json").read_text())["groups"]


def _check_written_once(run: Path, world: int = 2) -> None:
    """Rank 0 alone wrote: one metrics line per epoch and phase, and the run folder records the world size."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [("search", 0), ("search", 1), ("finetune", 0)]
    assert all(r["world_size"] == world for r in lines)
    assert json.loads((run / "report.json").read_text())["machine"]["processes"]["world_size"] == world


def test_two_processes_give_the_one_process_result(tiny_archive, tmp_path):
    """rarts (both weight copies and α) and fine-tuning on a net without batch statistics, through the command
    line under torchrun, against the plain single-process run."""
    recipe = _recipe("test_plain", "rarts", tiny_archive)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = _torchrun(["run", "r.yaml", "--out", "two", "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _reference(recipe, tmp_path / "one")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    _check_written_once(tmp_path / "two")
    assert done.stdout.count("run folder") == 1  # rank 0 alone prints


def _imagefolder(root: Path, sets) -> Path:
    for split, data in zip(("train", "test"), sets, strict=True):
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
            path = root / split / CIFAR10_CLASSES[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image).numpy().tobytes())
    return root


@pytest.mark.slow
def test_two_processes_give_the_one_process_result_for_every_kind(tiny_archive, tiny_sets, tmp_path):
    """BN nets (against the split-BN reference) with rarts, darts2 and slimming; darts2 without batch statistics;
    and rarts with the data streamed by DataLoader workers, against the single process holding it in memory."""
    folder = str(_imagefolder(tmp_path / "folder", tiny_sets))
    streamed = dict(name="imagefolder", image_size=32, resize=32)
    cases = {  # name: (distributed recipe, reference recipe)
        "bn-rarts": (_recipe("test_bn", "rarts", tiny_archive), _recipe("test_bn_split2", "rarts", tiny_archive)),
        "bn-darts2": (_recipe("test_bn", "darts2", tiny_archive), _recipe("test_bn_split2", "darts2", tiny_archive)),
        "bn-slimming": (_recipe("test_bn", "slimming", tiny_archive),
                        _recipe("test_bn_split2", "slimming", tiny_archive)),
        "plain-darts2": (_recipe("test_plain", "darts2", tiny_archive),) * 2,
        "plain-stream": (_recipe("test_plain", "rarts", folder, **streamed, loader="stream", workers=1),
                         _recipe("test_plain", "rarts", folder, **streamed, loader="memory")),
    }
    (tmp_path / "cases.json").write_text(json.dumps([{"recipe": two, "out": f"two-{name}"}
                                                     for name, (two, _) in cases.items()]))
    done = _torchrun(["--cases", "cases.json"], tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (_, one) in cases.items():
        _reference(one, tmp_path / f"one-{name}")
        _assert_same_run(tmp_path / f"one-{name}", tmp_path / f"two-{name}")
        _check_written_once(tmp_path / f"two-{name}")
    assert json.loads((tmp_path / "two-plain-stream" / "report.json").read_text())["data"]["loader"] == "stream"


@pytest.mark.slow
def test_a_crashed_rank_stops_every_rank_and_resume_finishes_the_run(tiny_archive, tmp_path):
    recipe = _recipe("test_plain", "rarts", tiny_archive)
    recipe["search"]["epochs"] = 3
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    whole = _torchrun(["run", "r.yaml", "--out", "whole", "--no-progress"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crashed = _torchrun(["run", "r.yaml", "--out", "run", "--no-progress"], tmp_path, timeout=180,
                        env={"SLIMRARTS_TEST_DIE": "1:search:1"})  # rank 1 dies as search epoch 1 starts
    assert crashed.returncode != 0  # every rank stopped (a hang would have hit the timeout)
    assert "exitcode" in crashed.stderr and not (tmp_path / "run" / "slim.pt").exists()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "search.pt", weights_only=True)
    assert saved["epoch"] == 0  # the last complete epoch
    resumed = _torchrun(["run", "r.yaml", "--out", "run", "--resume", "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _learned(tmp_path / "whole"), _learned(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the same ranks, same order
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [("search", 0), ("search", 1), ("search", 2),
                                                          ("finetune", 0)]


@pytest.mark.slow
def test_a_divergence_stops_every_rank_together(tiny_archive, tmp_path):
    recipe = _recipe("test_plain", "rarts", tiny_archive)
    recipe["search"]["optim"]["lr"] = 1e12
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    done = _torchrun(["run", "r.yaml", "--out", "run", "--no-progress"], tmp_path, timeout=180)
    assert done.returncode != 0
    assert done.stderr.count("slimrarts run: stopped: the search phase diverged in epoch 0") == 2  # both ranks
    assert not (tmp_path / "run" / "checkpoints" / "search.pt").exists()


# ---- the helpers and the shards, in this process ------------------------------------------------------------------

def test_without_a_group_every_helper_is_a_no_op():
    t = torch.arange(4.0)
    assert not dist.active() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    dist.all_reduce_([t])
    dist.sync_buffers_([t])
    assert torch.equal(t, torch.arange(4.0))
    assert dist.any_true(True) and not dist.any_true(False) and dist.sum_int(3) == 3
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.from_main(lambda: 5) == 5
    assert not dist.init("cpu")  # not launched by torchrun: no group is made
    assert dist.wrap_ddp(model := nn.Linear(2, 2), torch.device("cpu")) is model


@pytest.fixture
def group_of_one():
    """A gloo process group of one process (this one), removed afterwards."""
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def test_collectives_in_a_group(group_of_one):
    tensors = [torch.randn(5, 3), torch.arange(7, dtype=torch.float64), torch.randn(()), torch.randn(40)]
    before = [t.clone() for t in tensors]
    dist.all_reduce_(tensors, "mean", bucket_bytes=64)  # several buckets, of two dtypes
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    dist.all_reduce_(tensors, "sum")
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    assert dist.any_true(True) and not dist.any_true(False) and dist.sum_int(4) == 4
    assert dist.describe() == {"world_size": 1, "backend": "gloo", "local_world_size": 1}
    with pytest.raises(ValueError, match="from rank 0"):
        dist.from_main(lambda: (_ for _ in ()).throw(ValueError("from rank 0")))
    with pytest.raises(dist.PeerError, match="continue with --resume"), dist.peer_errors():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1")
    model = nn.Linear(3, 2)
    wrapped = dist.wrap_ddp(model, torch.device("cpu"))
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is model


def test_shards_make_up_every_global_batch(tiny_sets):
    train, test = tiny_sets
    for world in (2, 3):
        for data, kw in ((train, dict(batch_size=30, train=True, cutout=8, seed=4)),
                         (test, dict(batch_size=30, train=False))):  # test: 80 images, a last batch of 20
            whole = list(DeviceLoader(data, **kw))
            parts = [list(DeviceLoader(data, shard=(r, world), **kw)) for r in range(world)]
            for i, (x, y) in enumerate(whole):
                assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
                assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(ValueError, match="multiple of 4"):
        DeviceLoader(train, 30, train=True, shard=(0, 4))


def test_make_loaders_splits_the_global_batch(tiny_archive):
    cfg = DataConfig(root=tiny_archive, batch_size=20, eval_batch_size=40)
    two = make_loaders(cfg, shard=(1, 2))
    assert two.train.batch_size == 10 and two.train.global_batch_size == 20 and two.test.batch_size == 20
    assert two.info["world_size"] == 2 and two.info["global_batch_size"] == 20
    each = make_loaders(cfg, shard=(1, 2), per_process=True)
    assert each.train.batch_size == 20 and each.train.global_batch_size == 40
    with pytest.raises(ValueError, match="dist.batch=process"):
        make_loaders(DataConfig(root=tiny_archive, batch_size=25), shard=(0, 2))


def test_sync_batchnorm_converts_and_reverts():
    model = create_model("tiny_resnet")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    synced = dist.convert_sync_bn(model)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    x = torch.randn(4, 3, 32, 32)
    out = synced(x)  # without a group a SyncBatchNorm normalises locally
    plain = dist.revert_sync_bn(synced)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    back = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [type(m) for m in back] == [nn.BatchNorm2d] * len(bns)
    assert all(a.weight is b.weight and a.running_mean is b.running_mean for a, b in zip(back, bns, strict=True))
    assert out.shape == (4, 10)


def test_settings_several_processes_cannot_honour(monkeypatch):
    recipe = load_recipe({"dist": {"sync_bn": True}, "search": {"cuda_graph": True}})
    check_processes(recipe, torch.device("cpu"))  # one process: nothing to refuse
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="dist.sync_bn"):
        check_processes(recipe, torch.device("cpu"))
    with pytest.raises(ValueError, match="search.cuda_graph"):
        check_processes(recipe, torch.device("cuda"))
    check_processes(recipe, torch.device("cuda"), ("finetune",))  # only the sections the command runs


def test_the_dist_recipe_section():
    recipe = load_recipe({})
    assert (recipe.dist.batch, recipe.dist.sync_bn, recipe.dist.backend) == ("global", False, "auto")
    with pytest.raises(ConfigError, match="dist.batch"):
        load_recipe({"dist": {"batch": "local"}})
    with pytest.raises(ConfigError, match="dist.timeout_s"):
        load_recipe({"dist": {"timeout_s": 1}})
    assert dist.choose_backend("cpu") == "gloo" and dist.choose_backend("cuda") == "nccl"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        dist.choose_backend("cpu", "nccl")
