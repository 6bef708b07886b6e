"""Distillation: Hinton's loss equals its hand-written form; the teacher stays frozen; fp32 under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from slimrarts.engine.distill import Distiller, distillation_loss
from slimrarts.engine.optim import SGD
from slimrarts.engine.step import TrainStep


def _fixed():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3, torch.tensor([0, 4, 2, 2, 1, 3])


def _hand(student, teacher, target, w, t):
    """(1 − w)·CE + w·T²·KL(p_t ‖ p_s), written out with loops over the batch and the classes."""
    batch, classes = student.shape
    ce = kl = 0.0
    for i in range(batch):
        zs = [math.exp(v) for v in student[i].tolist()]
        ce -= math.log(zs[int(target[i])] / sum(zs))
        ps = [math.exp(v / t) for v in student[i].tolist()]
        pt = [math.exp(v / t) for v in teacher[i].tolist()]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        kl += sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(classes))
    return (1 - w) * ce / batch + w * t * t * kl / batch


@pytest.mark.parametrize("w, t", [(0.0, 4.0), (0.3, 1.0), (0.5, 4.0), (0.9, 2.5), (1.0, 8.0)])
def test_loss_equals_hand_computed_ce_plus_kl(w, t):
    s, te, y = _fixed()
    got = distillation_loss(s, te, y, weight=w, temperature=t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_hand(s, te, y, w, t), rel=1e-5)


def test_temperature_and_weight_are_respected():
    s, te, y = _fixed()
    ce = nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(distillation_loss(s, te, y, weight=0.0, temperature=3.0), ce)
    # identical logits: no soft term at any temperature, only the weighted hard one
    for t in (1.0, 5.0):
        torch.testing.assert_close(distillation_loss(s, s, y, weight=0.25, temperature=t), 0.75 * ce)
    soft = {t: distillation_loss(s, te, y, weight=1.0, temperature=t) for t in (1.0, 4.0)}
    assert soft[1.0] != soft[4.0]
    # a model's tuple output (auxiliary heads): the first element is the student's logits
    torch.testing.assert_close(distillation_loss((s, s * 0), te, y, weight=0.5, temperature=2.0),
                               distillation_loss(s, te, y, weight=0.5, temperature=2.0))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5))


def test_gradient_flows_only_to_the_student_and_the_teacher_stays_frozen():
    teacher, student = _net(0), _net(1)
    teacher.train()  # the distiller puts it in eval mode: its BN statistics never move
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, weight=0.7, temperature=3.0).attach(student)
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8) % 5
    student.train()
    out = student(x)
    loss = distiller(out, y)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, stats[k]), k
    torch.testing.assert_close(loss, distillation_loss(out, teacher(x), y, weight=0.7, temperature=3.0))
    # the teacher runs only with training-mode forwards of the student, and each batch's logits are used once
    student.eval()
    student(x)
    with pytest.raises(RuntimeError, match="no teacher logits"):
        distiller(out, y)
    distiller.detach()
    student.train()
    student(x)
    with pytest.raises(RuntimeError, match="attach"):
        distiller(student(x), y)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_train_step_with_distillation_updates_only_the_student(amp):
    teacher, student = _net(0), _net(1)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = [p.detach().clone() for p in student.parameters()]
    distiller = Distiller(teacher, weight=0.5, temperature=4.0).attach(student)
    step = TrainStep(student, SGD(student.parameters(), lr=0.1), device=torch.device("cpu"), amp=amp,
                     loss_fn=distiller)
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8) % 5
    student.train()
    step(x, y)
    metrics = step.read()
    assert math.isfinite(metrics["loss"]) and metrics["n"] == 8
    changed = [not torch.equal(p, q) for p, q in zip(student.parameters(), before_s, strict=True)]
    assert all(changed[i] for i in (0, 2, 3, 4, 5))  # all but the conv bias, which BN cancels
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), k


def test_loss_is_fp32_under_bf16_autocast():
    s, te, y = _fixed()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = distillation_loss(s.bfloat16(), te.bfloat16(), y, weight=0.5, temperature=4.0)
    assert got.dtype == torch.float32
    # the only rounding is of the bf16 logits themselves
    ref = distillation_loss(s.bfloat16().float(), te.bfloat16().float(), y, weight=0.5, temperature=4.0)
    torch.testing.assert_close(got, ref)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\], got 1.5"):
        Distiller(_net(0), weight=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        Distiller(lambda x: x)
