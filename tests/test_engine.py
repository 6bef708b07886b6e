"""Engine: optimizers match torch.optim, schedules, fit with checkpoints, and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimrarts.data import DeviceLoader
from slimrarts.engine import SGD, Adam, evaluate, fit, load_checkpoint, lr_at, save_atomic
from slimrarts.models import create_model
from slimrarts.recipe import OptimConfig, TrainConfig


@pytest.mark.parametrize("ours, ref, kwargs", [
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    (SGD, torch.optim.SGD, dict(lr=0.3)),
    (Adam, torch.optim.Adam, dict(lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
])
def test_optimizers_match_torch(ours, ref, kwargs):
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa, ob = ours(a, **kwargs), ref(b, **kwargs)
    for it in range(6):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g.clone(), g.clone()
        if it == 3:
            oa.set_lr(kwargs["lr"] / 3)
            for group in ob.param_groups:
                group["lr"] = kwargs["lr"] / 3
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_optimizer_state_roundtrip_keeps_lr_tensor():
    p = [torch.randn(3, requires_grad=True)]
    opt = SGD(p, lr=0.1, momentum=0.9)
    p[0].grad = torch.ones(3)
    opt.step()
    opt.set_lr(0.02)
    other = SGD([p[0].detach().clone().requires_grad_()], lr=0.1, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    assert other.lr_tensor().item() == pytest.approx(0.02)
    torch.testing.assert_close(other.state[other.param_groups[0]["params"][0]]["momentum_buffer"], torch.ones(3))


def test_step_schedule_drops_at_fractions_of_epochs():
    kw = dict(base_lr=0.1, steps_per_epoch=10, epochs=160, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(799, **kw) == pytest.approx(0.1)
    assert lr_at(800, **kw) == pytest.approx(0.01)
    assert lr_at(1200, **kw) == pytest.approx(0.001)


def test_cosine_schedule_and_warmup():
    kw = dict(base_lr=1.0, steps_per_epoch=10, epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.5, abs=0.02)
    assert lr_at(99, **kw) < 0.01


def test_save_atomic_leaves_no_temp_files(tmp_path):
    save_atomic({"a": torch.ones(2), "n": 3}, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt")["n"] == 3


def _setup(tiny_sets):
    train, test = tiny_sets
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    cfg = TrainConfig(epochs=3, optim=OptimConfig(lr=0.05, milestones=[0.5]), log_every=1)
    return model, DeviceLoader(train, 32, train=True, seed=3), DeviceLoader(test, 50, train=False), cfg


class _Interrupt(Exception):
    pass


def test_fit_learns_and_writes_metrics(tiny_sets, tmp_path):
    model, train, test, cfg = _setup(tiny_sets)
    before = evaluate(model, test)
    result = fit(model, train, test, cfg=cfg, device="cpu", run_dir=tmp_path, progress=False)
    assert len(result.history) == 3
    assert result.final["test_acc"] > before["acc"] + 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert lines[-1]["lr"] == pytest.approx(0.005)


def test_plain_dataloader_works(tiny_sets):
    train, test = tiny_sets
    ds = torch.utils.data.TensorDataset(train.images.float() / 255, train.labels)
    dl = torch.utils.data.DataLoader(ds, batch_size=40, shuffle=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    result = fit(model, dl, dl, cfg=TrainConfig(epochs=2, optim=OptimConfig(lr=0.1)), device="cpu", progress=False)
    assert result.final["train_n"] == len(ds)
