"""The one eval-mode (and train-mode) block: every submodule's training flag comes back, also after an exception."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimrarts.metrics import count_macs
from slimrarts.modes import evaluating, training


def _mixed() -> nn.Sequential:
    """A training model with a frozen norm (eval inside train) and a head in eval mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Dropout()))
    model.train()
    model[1].eval()
    model[3].eval()
    return model


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_evaluating_sets_eval_and_restores_each_module():
    model = _mixed()
    before = _flags(model)
    assert before == [True, True, False, True, False, False, False]
    with evaluating(model):
        assert not any(_flags(model))
    assert _flags(model) == before  # model.train(was) would have unfrozen the norm and the head


def test_training_sets_train_and_restores_each_module():
    model = _mixed()
    before = _flags(model)
    with training(model):
        assert all(_flags(model))
    assert _flags(model) == before


@pytest.mark.parametrize("mode", [evaluating, training])
def test_flags_come_back_after_an_exception(mode):
    model, other = _mixed(), _mixed().eval()
    before, before_other = _flags(model), _flags(other)
    with pytest.raises(RuntimeError, match="inside"), mode(model, other):
        raise RuntimeError("inside")
    assert _flags(model) == before and _flags(other) == before_other


def test_a_module_added_inside_takes_the_models_former_flag():
    model = _mixed()
    with evaluating(model):
        model.append(nn.Identity())  # e.g. a ChannelSelect inserted by channel removal
    assert model[-1].training is True
    model.eval()
    with training(model):
        model.append(nn.Identity())
    assert model[-1].training is False


def test_counting_macs_leaves_a_mixed_model_as_it_was():
    model = _mixed()
    before = _flags(model)
    count_macs(model, (1, 3, 8, 8))
    assert _flags(model) == before
    with pytest.raises(RuntimeError):
        count_macs(model, example_inputs=torch.randn(1, 5, 8, 8))  # wrong channels: the forward raises
    assert _flags(model) == before
