"""Selection under a MACs / params / latency budget, checked on the really cut models; latency model and tighten."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from slimrarts.metrics import macs_and_params
from slimrarts.models import create_model
from slimrarts.width import (
    attach_gates,
    budget_floor,
    build_cost_model,
    build_latency_model,
    min_kept,
    parse_budget,
    remove_channels,
    select_budget,
    tighten,
    time_models,
    ungated_copy,
)
from slimrarts.width.latency import latency_cache_dir

X = (3, 32, 32)


def _gated(name, scopes, seed=0):
    """A model, its gates with random |α| scores in [0.1, 1.5], and its cost model."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10)
    gates = attach_gates(model, torch.randn(1, *X), scopes)
    with torch.no_grad():
        for a in gates.alphas:
            a.uniform_(0.1, 1.5)
    return model, gates, build_cost_model(gates)


BUDGET_CASES = [
    ("preresnet20", ("internal", "branch-input")),
    ("resnet20", ("internal",)),
    ("mobilenetv2_cifar", ("internal",)),
    ("torchvision:resnet18", ("internal",)),
]


@pytest.mark.parametrize("kind", ["macs", "params"])
@pytest.mark.parametrize("name, scopes", BUDGET_CASES, ids=[n for n, _ in BUDGET_CASES])
def test_half_budget_lands_in_49_to_50_percent_of_the_cut_model(name, scopes, kind):
    model, gates, cm = _gated(name, scopes)
    dense = macs_and_params(model, (1, *X))
    keep = select_budget(gates.alphas, cm, "50%", kind)
    predicted = cm(keep)
    remove_channels(gates, keep)
    real = macs_and_params(model, (1, *X))
    assert predicted == real
    i = 0 if kind == "macs" else 1
    assert 0.49 * dense[i] <= real[i] <= 0.50 * dense[i]


def _add_back_costs(fn, kept, step_of):
    """The cost each group would add by growing one allowed step (None: at full width)."""
    out = []
    for g, (k, n) in enumerate(zip(kept, fn.sizes, strict=True)):
        new = min(n, (k // step_of(g) + 1) * step_of(g)) if k < n else None
        if new is None:
            continue
        grown = list(kept)
        grown[g] = new
        out.append(fn.value(grown) - fn.value(kept))
    return out


def test_min_channels_and_round_to_are_honoured_under_a_budget():
    """Kept counts are multiples of round_to (or the full width) and at least min_channels rounded up; the cost is
    within the budget and no further step fits (within one round_to step of the target)."""
    model, gates, cm = _gated("torchvision:resnet18", ("internal", "coupled"))
    target = parse_budget("40%", "macs", cm.dense[0])
    keep = select_budget(gates.alphas, cm, target, "macs", min_channels=10, round_to=8)
    kept = [int(k.sum()) for k in keep]
    assert all(k == n or (k % 8 == 0 and k >= 16) for k, n in zip(kept, cm.sizes, strict=True))
    assert any(k < n for k, n in zip(kept, cm.sizes, strict=True))
    fn = cm.function("macs")
    assert fn.value(kept) <= target
    assert all(c > target - fn.value(kept) for c in _add_back_costs(fn, kept, lambda g: 8))
    remove_channels(gates, keep)
    assert macs_and_params(model, (1, *X))[0] <= target


def test_round_to_counts_channels_when_an_alpha_gates_several():
    """With repeat[g] channels per α entry, round_to and min_channels count channels, not entries."""
    _, gates, cm = _gated("resnet20", ("internal",))
    repeat = [2] * len(cm.sizes)
    keep = select_budget(gates.alphas, cm, "60%", "macs", round_to=4, min_channels=5, repeat=repeat)
    kept = [int(k.sum()) for k in keep]
    assert all(k == n or (2 * k % 4 == 0 and 2 * k >= 8) for k, n in zip(kept, cm.sizes, strict=True))
    assert min_kept(cm, min_channels=5, repeat=repeat) == [3] * len(cm.sizes)


def test_budget_keeps_the_best_scores_within_each_group():
    _, gates, cm = _gated("resnet20", ("internal",))
    with torch.no_grad():
        gates.alphas[0][:5] = 0.0  # dead channels go first
    keep = select_budget(gates.alphas, cm, "50%", "macs")
    for a, k in zip(gates.alphas, keep, strict=True):
        if 0 < int(k.sum()) < k.numel():
            assert a.detach().abs()[k].min() >= a.detach().abs()[~k].max()
    assert not keep[0][:5].any()


def test_budget_above_the_dense_cost_keeps_everything():
    _, gates, cm = _gated("resnet20", ("internal",))
    keep = select_budget(gates.alphas, cm, "100%", "params")
    assert all(k.all() for k in keep)
    keep = select_budget(gates.alphas, cm, 2 * cm.dense[0], "macs")
    assert all(k.all() for k in keep)


def test_an_impossible_budget_names_the_smallest_reachable_cost():
    _, gates, cm = _gated("resnet20", ("internal",))
    floor, dense = budget_floor(cm, "macs")
    assert 0 < floor < dense
    with pytest.raises(ValueError) as err:
        select_budget(gates.alphas, cm, "5%", "macs")
    message = str(err.value)
    assert "smallest reachable" in message and f"{floor / dense:.1%} of the dense" in message
    assert "coupled" in message
    with pytest.raises(ValueError, match="did you mean|fraction"):
        select_budget(gates.alphas, cm, 0.5, "macs")  # a bare float is absolute: 0.5 MACs
    _, _, wide = _gated("resnet20", ("internal", "coupled"))
    assert budget_floor(wide, "macs")[0] < floor  # wider scopes reach further
    assert budget_floor(cm, "macs", min_channels=4)[0] > floor
    # a target of exactly the floor is reachable (the running sum of savings must not round it away)
    for model_cm, scores in ((cm, gates.alphas), (wide, _gated("resnet20", ("internal", "coupled"))[1].alphas)):
        low = budget_floor(model_cm, "macs")[0]
        keep = select_budget([torch.rand(a.shape) for a in scores], model_cm, low, "macs")
        assert [int(k.sum()) for k in keep] == [1] * len(keep)


def test_exclude_and_max_pruned_are_honoured():
    _, gates, cm = _gated("resnet20", ("internal", "coupled"))
    names = [g.name for g in cm.groups]
    keep = select_budget(gates.alphas, cm, "45%", "macs", exclude=["layer3.*"])
    for g, k in zip(cm.groups, keep, strict=True):
        if any(n.startswith("layer3.") and role != "in" for n, role in cm.layers[names.index(g.name)].items()):
            assert k.all(), g.name
    assert not all(k.all() for k in keep)
    keep = select_budget(gates.alphas, cm, "55%", "macs", max_pruned=0.5)
    assert all(int(k.sum()) >= k.numel() - math.floor(0.5 * k.numel()) for k in keep)
    lows = min_kept(cm, max_pruned={"layer1.*": 0.0, "layer2.*": 0.25})
    for g, lo in zip(cm.groups, lows, strict=True):
        roles = cm.layers[names.index(g.name)]
        if any(n.startswith("layer1.") and r != "in" for n, r in roles.items()):
            assert lo == g.size
    with pytest.raises(ValueError, match="did you mean 'layer1.0.conv1'"):
        min_kept(cm, exclude=["layer1.0.conv_1"])
    with pytest.warns(UserWarning, match="changes nothing"):
        min_kept(cm, exclude=["fc"])  # the classifier only reads pruned channels: its outputs are never pruned
    with pytest.raises(ValueError, match="max_pruned"):
        min_kept(cm, max_pruned=1.5)


@pytest.mark.parametrize("value, kind, expected", [
    (0.5, "macs", 50.0), ("0.5", "macs", 50.0), ("50%", "params", 50.0), ("20M", "macs", 20e6),
    ("1.2M", "params", 1.2e6), ("2e3", "params", 2000.0), (250, "macs", 250.0), ("3.5ms", "latency", 3.5e-3),
    ("800us", "latency", 8e-4), ("25%", "latency", 25.0), ("1", "macs", 100.0),
])
def test_parse_budget(value, kind, expected):
    assert parse_budget(value, kind, 100.0) == pytest.approx(expected)


@pytest.mark.parametrize("value, kind, match", [
    ("3.5ms", "macs", "time unit"), ("20M", "latency", "unit 'M'"), (5, "latency", "needs a unit"),
    ("0%", "macs", "percentage"), ("abc", "params", "not understood"), (-1, "macs", "positive"),
    ("50%", "flops", "unknown"), ("150%", "macs", "percentage"),
])
def test_parse_budget_errors(value, kind, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(value, kind, 100.0)
    with pytest.raises(TypeError):
        parse_budget(True, "macs", 100.0)


class ConvTimer:
    """A deterministic timer: seconds = 1e-5 + 1e-9 · (conv and linear MACs of the call)^power, where convs with an
    out-width that is not a multiple of 8 count `misaligned` times (to mimic tensor-core tiles)."""

    def __init__(self, power: float = 1.0, misaligned: float = 1.0):
        self.power, self.misaligned, self.calls = power, misaligned, 0

    def __call__(self, fn, n):
        total = [0.0]

        def hook(m, _args, out):
            if isinstance(m, nn.Conv2d):
                macs = out.numel() * m.weight[0].numel()
                total[0] += macs * (1.0 if m.out_channels % 8 == 0 else self.misaligned)
            elif isinstance(m, nn.Linear):
                total[0] += out.numel() * m.in_features

        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            fn()
        finally:
            handle.remove()
        self.calls += 1
        return [1e-5 + 1e-9 * total[0] ** self.power] * n


def test_latency_model_predicts_the_dense_time_and_is_cached():
    _, gates, cm = _gated("resnet20", ("internal",))
    timer = ConvTimer()
    lm = build_latency_model(gates, cm, timer=timer, warmup=0, repeats=1)
    assert lm(cm.sizes) == pytest.approx(lm.dense_s, rel=1e-12)
    assert lm.align == 1 and lm.table["align_probes"] == []  # not probed on CPU unless asked
    assert lm.path is not None and lm.path.parent == latency_cache_dir() and lm.path.is_file()
    assert json.loads(lm.path.read_text())["table"]["dense_s"] == lm.dense_s
    calls = timer.calls
    again = build_latency_model(gates, cm, timer=timer, warmup=0, repeats=1)
    assert timer.calls == calls and again.dense_s == lm.dense_s
    # with linear costs the per-layer sum is exact: the model predicts a cut network's time
    keep = select_budget(gates.alphas, lm, "60%", "latency")
    predicted = lm(keep)
    assert predicted <= 0.6 * lm.dense_s
    remove_channels(gates, keep)
    assert time_models([gates.model], X, timer=timer, rounds=2, repeats=1, warmup=0)[0].median_s == pytest.approx(
        predicted, rel=1e-6)


def test_alignment_to_8_is_set_only_when_measured_faster():
    _, gates, cm = _gated("resnet20", ("internal",))
    plain = build_latency_model(gates, cm, timer=ConvTimer(), warmup=0, repeats=1, probe_align=True, cache=False)
    assert plain.align == 1 and plain.table["align_probes"]
    tiles = build_latency_model(gates, cm, timer=ConvTimer(misaligned=2.0), warmup=0, repeats=1,
                                probe_align=True, cache=False)
    assert tiles.align == 8
    keep = select_budget(gates.alphas, tiles, "70%", "latency", round_to=tiles.align)
    assert all(int(k.sum()) % 8 == 0 for k in keep)


def _tighten_setup(timer):
    """`run(max_rounds, **kw)` tightens a resnet20 cut (scored by the gates' α) to 60% of the dense time
    under a deterministic timer; also the latency model, the scores and the target."""
    _, gates, cm = _gated("resnet20", ("internal", "coupled"))
    dense = ungated_copy(gates)
    lm = build_latency_model(gates, cm, timer=timer, warmup=0, repeats=1, cache=False, grid=(0.5,))
    scores = [a.detach().clone() for a in gates.alphas]

    def cut(keep):
        slim = ungated_copy(gates)
        remove_channels(attach_gates(slim, torch.randn(1, *X), ("internal", "coupled")), keep)
        return slim

    target = 0.6 * lm.dense_s

    def run(max_rounds, rounds=2, **kw):
        return tighten(lambda t: select_budget(scores, lm, t, "latency"), cut, dense, target, X, predict=lm,
                       max_rounds=max_rounds, timer=timer, rounds=rounds, repeats=1, warmup=0, **kw)

    return run, lm, scores, target


def test_tighten_lowers_the_target_until_the_real_network_meets_it():
    """A timer whose cost is concave in MACs makes the per-layer sum under-predict slim networks: the first cut
    misses, tighten selects again under lower targets and meets the target within the bounded rounds."""
    run, lm, scores, target = _tighten_setup(ConvTimer(power=0.95))
    result = run(4)
    history = result.history
    assert not history[0]["met"] and result.met and len(history) >= 2
    assert result.timing.median_s <= target
    targets = [h["model_target_s"] for h in history]
    assert targets == sorted(targets, reverse=True) and targets[0] == pytest.approx(target)
    assert result.dense_timing.median_s == pytest.approx(lm.dense_s)
    with pytest.warns(RuntimeWarning, match="not met after 1"):
        missed = run(1, rounds=1)
    assert not missed.met


def test_tighten_loosens_a_cut_that_is_much_faster_than_needed():
    """A timer convex in MACs makes the per-layer model over-predict slim networks: the first cut meets the target
    with a wide margin (it pruned more than needed); tighten raises the model target and ends with the met cut
    closest to the target, within `slack` of it."""
    run, lm, scores, target = _tighten_setup(ConvTimer(power=1.2))
    result = run(4, slack=0.05)
    first = result.history[0]
    assert first["met"] and first["measured_s"] < 0.9 * target  # the model over-predicted: far past the target
    assert result.met and 0.95 * target <= result.timing.median_s <= target
    assert result.history[1]["model_target_s"] > target  # loosened
    assert sum(int(k.sum()) for k in result.keep) > sum(
        int(k.sum()) for k in select_budget(scores, lm, target, "latency"))  # keeps more channels than round 0


def test_latency_table_interpolates_and_clips_slow_outliers():
    """Piecewise bilinear between grid points; an outlier slower than a wider layer is clipped to it; the
    least-squares bilinear fit used by the search's cost term is exact on a bilinear table."""
    from slimrarts.width.latency import _Table

    xs, ys = [0.25, 0.5, 1.0], [0.5, 1.0]
    exact = [[1 + 2 * x + 3 * y + 4 * x * y for y in ys] for x in xs]
    table = _Table(xs, ys, exact)
    assert table(0.75, 0.75) == pytest.approx((exact[1][0] + exact[1][1] + exact[2][0] + exact[2][1]) / 4)
    fit = table.bilinear()
    assert (fit.cxy, fit.cx, fit.cy, fit.c1) == pytest.approx((4, 2, 3, 1))
    noisy = [row[:] for row in exact]
    noisy[0][0] = 100.0  # a load spike at the narrowest point
    clipped = _Table(xs, ys, noisy)
    assert clipped(0.25, 0.5) == pytest.approx(min(exact[0][1], exact[1][0]))
    assert clipped(1.0, 1.0) == exact[2][1]


def test_budget_on_grouped_convs_counts_alpha_entries_and_matches_the_cut():
    """With α tied across conv groups (`repeat` channels per entry), the cost model's kept fractions and the budget
    selection work in α entries, and the prediction equals the really cut grouped network."""
    from conftest import TinyGrouped

    torch.manual_seed(0)
    model = TinyGrouped()
    gates = attach_gates(model, torch.randn(2, 3, 16, 16), "internal")
    assert max(gates.repeats) > 1
    with torch.no_grad():
        for a in gates.alphas:
            a.uniform_(0.1, 1.5)
    cm = build_cost_model(gates, (3, 16, 16))
    dense = macs_and_params(model, (1, 3, 16, 16))
    keep = select_budget(gates.alphas, cm, "60%", "macs", min_channels=4)
    assert [len(k) for k in keep] == [len(a) for a in gates.alphas]
    predicted = cm(keep)
    remove_channels(gates, keep, check_input=torch.randn(2, 3, 16, 16))
    assert predicted == macs_and_params(model, (1, 3, 16, 16))
    assert predicted[0] <= 0.60 * dense[0]
    b = model.b[0]
    assert b.in_channels % b.groups == 0 and b.out_channels % b.groups == 0 and b.in_channels >= 4
