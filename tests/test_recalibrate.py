"""BN recalibration after the cut, the scores a search can rank by, and the magnitude start of the gates (issue 20)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import tiny_loaders

import slimrarts
from slimrarts.engine.optim import build_optimizer
from slimrarts.engine.recalibrate import recalibrate_bn
from slimrarts.models import create_model
from slimrarts.recipe import ArchOptimConfig, Recipe, dump_recipe, load_recipe, save_or_check_recipe
from slimrarts.search.base import SearchState, arch_step
from slimrarts.width import attach_gates
from slimrarts.width.scores import init_from_magnitude, search_scores, site_magnitude


def _calibrated(name: str = "tiny_preresnet") -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(-1.5, 1.5)  # some negative γ: the magnitude start must keep their sign
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


class _Batches:
    """A fixed list of (x, y) batches that records the epochs set on it."""

    def __init__(self, batches):
        self.batches, self.epoch, self.set = batches, 5, []

    def set_epoch(self, epoch):
        self.set.append(epoch)
        self.epoch = epoch

    def __iter__(self):
        return iter(self.batches)


def test_recalibration_changes_only_running_statistics_to_their_average():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    gates = attach_gates(model, torch.randn(2, 3, 8, 8), "internal", warn=False)
    with torch.no_grad():
        for a in gates.alphas:
            a.uniform_(0.5, 1.5)
    params = {k: v.clone() for k, v in model.named_parameters()}
    alphas = [a.detach().clone() for a in gates.alphas]
    x_test = torch.randn(4, 3, 8, 8)
    before = model(x_test).detach()
    batches = [(torch.randn(6, 3, 8, 8) * (i + 1), torch.zeros(6, dtype=torch.long)) for i in range(5)]
    loader = _Batches(batches)

    assert recalibrate_bn(model, loader, 3) == 3
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(gates.alphas, alphas, strict=True))
    assert not model.training and loader.set == [0, 5]  # eval mode kept; epoch 0 read, the loader's epoch restored
    assert not torch.allclose(model(x_test), before)
    # by hand: the first norm's mean/var are the plain averages of the per-batch statistics of the first 3 batches
    conv = model[0]
    outs = [conv(x) for x, _ in batches[:3]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, var, atol=1e-4, rtol=1e-5)
    assert model[1].momentum == 0.1  # the norms' own momentum is back


def test_recalibration_off_and_bad_values():
    model = _calibrated()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_bn(model, _Batches([(torch.randn(2, 3, 32, 32), torch.zeros(2))]), 0) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batches must be >= 0"):
        recalibrate_bn(model, [], -1)
    with pytest.raises(ValueError, match="yields no batches"):
        recalibrate_bn(model, _Batches([]), 4)


def test_magnitude_start_preserves_the_output_and_sets_alpha_to_normalised_gamma():
    model = _calibrated()
    x = torch.randn(4, 3, 32, 32)
    gates = attach_gates(model, x[:2], ["internal", "branch-input"], warn=False)
    ref = model(x).detach()
    mags = site_magnitude(gates)
    s = init_from_magnitude(gates)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    for a, m, v in zip(gates.alphas, mags, s, strict=True):
        torch.testing.assert_close(a.detach(), (m / m.mean()).clamp_min(1e-3))
        torch.testing.assert_close(a.detach(), v)
    # the sites now all have the group's mean magnitude, so |α·γ| is the dense |γ| up to the group's scale
    for m, a, after in zip(mags, gates.alphas, site_magnitude(gates), strict=True):
        torch.testing.assert_close(after * a.detach(), m, rtol=1e-5, atol=1e-6)


def test_alpha_gamma_score_by_hand():
    model = _calibrated()
    x = torch.randn(2, 3, 32, 32)
    gates = attach_gates(model, x, "internal", warn=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for a in gates.alphas:
            a.uniform_(-1, 1)
    modules = dict(model.named_modules())
    scores = search_scores(gates, "alpha_gamma")
    for group, a, score in zip(gates.groups, gates.alphas, scores, strict=True):
        norms = [site for site in group.sites if site.fold == "norm"]  # a producer beside a norm is not read
        assert norms
        raw = a.detach().abs() * sum(modules[site.module].weight.detach().abs() for site in norms)
        torch.testing.assert_close(score, raw / raw.mean())
    assert all(torch.equal(s, a.detach().abs()) for s, a in zip(search_scores(gates, "alpha"), gates.alphas,
                                                                 strict=True))
    with pytest.raises(ValueError, match="needs the importance"):
        search_scores(gates, "grad")


class _Problem:
    def __init__(self, arch):
        self.arch, self.importance, self.steps = arch, [torch.zeros_like(a) for a in arch], 0

    def arch_penalty(self):
        return (self.arch[0] ** 2).sum() * 100  # must not enter the importance

    def after_arch_step(self, lr):
        self.steps += 1


def test_arch_step_accumulates_alpha_times_data_gradient():
    a = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    problem = _Problem([a])
    opt = build_optimizer([a], ArchOptimConfig(optimizer="sgd", lr=0.1, momentum=0.0))
    state = SearchState(w={}, w_buffers={}, opt_w=opt, optim_arch=opt)
    expected = torch.zeros(3)
    for g in (torch.tensor([0.3, 0.1, -4.0]), torch.tensor([-1.0, 0.0, 2.0])):
        expected += (a.detach() * g).abs()
        arch_step(problem, state, [g.clone()])
    torch.testing.assert_close(problem.importance[0], expected)
    assert problem.steps == 2


@pytest.mark.parametrize("score", ["grad", "alpha_gamma"])
def test_prune_ranks_by_the_chosen_score(tiny_sets, tmp_path, score):
    torch.manual_seed(0)
    cfg = {"search": {"epochs": 1, "score": score, "init": "magnitude", "optim": {"lr": 0.05}},
           "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"recalibrate": 2}, "report": {"latency": False}}
    r = slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), 0.4, config=cfg,
                        run_dir=tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "alphas.json").read_text())
    assert stored["score"] == score
    assert r.report["accuracy"]["recalibrated_batches"] == 2
    assert "hybrid" in r.report["method_note"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "search.pt", weights_only=False)
    state = ckpt.get("state", ckpt)
    found = [v for k, v in _walk(state) if k == "importance"]
    assert (score == "grad") == bool(found)
    if found:
        assert all(float(t.min()) >= 0 for t in found[0]) and any(float(t.sum()) > 0 for t in found[0])


def _walk(d, depth=0):
    if isinstance(d, dict) and depth < 4:
        for k, v in d.items():
            yield k, v
            yield from _walk(v, depth + 1)


def test_folders_made_before_recalibration_resume_with_it_off(tmp_path):
    recipe = load_recipe({}, [])
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    text = (tmp_path / "recipe.yaml").read_text()
    old = "\n".join(line for line in text.splitlines() if not line.strip().startswith("recalibrate:"))
    (tmp_path / "recipe.yaml").write_text(old + "\n")
    resumed = load_recipe({}, [])
    assert resumed.prune.recalibrate == 40
    save_or_check_recipe(resumed, tmp_path, resume=True)
    assert resumed.prune.recalibrate == 0
    fresh: Recipe = load_recipe({}, [])
    dump_recipe(fresh, tmp_path / "recipe.yaml")  # a folder that records it keeps its value
    save_or_check_recipe(fresh, tmp_path, resume=True)
    assert fresh.prune.recalibrate == 40
