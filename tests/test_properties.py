"""Property tests (hypothesis): selection invariants for random groups, scores and settings; exact removal on random
small nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the `test` extra (hypothesis)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from slimrarts.width import attach_gates, prox_l1_, remove_channels, select_l1, select_ratio  # noqa: E402

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
NETS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# scores with many ties (a few distinct magnitudes, both signs) so that the tie-break rule matters
values = st.sampled_from([0.0, 0.25, -0.25, 0.5, 1.0, -1.0, 2.0, 1e-3])
groups = st.lists(st.lists(values, min_size=1, max_size=9), min_size=1, max_size=5)
settings_ = st.tuples(st.floats(0.0, 0.99), st.integers(1, 4), st.one_of(st.none(), st.integers(1, 4)))


def _flat_order(alphas):
    """(|α|, group, channel) of every channel: the order in which the threshold walks them."""
    return [(abs(v), g, c) for g, a in enumerate(alphas) for c, v in enumerate(a.tolist())]


@FAST
@given(groups, settings_)
def test_ratio_selection_invariants(raw, setting):
    ratio, min_channels, round_to = setting
    alphas = [torch.tensor(a) for a in raw]
    sizes = [len(a) for a in raw]
    total, target = sum(sizes), round(ratio * sum(sizes))
    prunable = sum(n - min(min_channels, n) for n in sizes)
    if target > prunable:
        with pytest.raises(ValueError, match="min_channels"):
            select_ratio(alphas, ratio, min_channels=min_channels, round_to=round_to)
        return
    keep = select_ratio(alphas, ratio, min_channels=min_channels, round_to=round_to)
    again = select_ratio([a.clone() for a in alphas], ratio, min_channels=min_channels, round_to=round_to)
    assert [k.tolist() for k in keep] == [k.tolist() for k in again]  # deterministic
    assert [k.dtype for k in keep] == [torch.bool] * len(sizes) and [k.numel() for k in keep] == sizes
    kept = [int(k.sum()) for k in keep]
    assert all(c >= min(min_channels, n) for c, n in zip(kept, sizes, strict=True))  # minimums
    if round_to is None:
        assert total - sum(kept) == target  # exactly round(ratio·N) pruned
        base = keep
    else:
        # multiples, capped at the size
        assert all(c % round_to == 0 or c == n for c, n in zip(kept, sizes, strict=True))
        assert total - sum(kept) <= target  # rounding only adds channels back
        base = select_ratio(alphas, ratio, min_channels=min_channels)
        # a superset
        assert all(bool(b[i]) <= bool(k[i]) for b, k in zip(base, keep, strict=True) for i in range(len(b)))
        assert all(c == min(n, -(-int(b.sum()) // round_to) * round_to)
                   for c, b, n in zip(kept, base, sizes, strict=True))
    # the threshold: a pruned channel never outranks a kept one, unless the kept one's group is at its minimum
    # (ties broken by group order, then channel order)
    floor = [min(min_channels, n) for n in sizes]
    base_kept = [int(b.sum()) for b in base]
    order = _flat_order(alphas)
    pruned = [o for o in order if not base[o[1]][o[2]]]
    for p in pruned:
        for o in order:
            if base[o[1]][o[2]] and o < p:
                assert base_kept[o[1]] == floor[o[1]], (o, p)


@FAST
@given(groups, st.integers(1, 4), st.one_of(st.none(), st.integers(1, 4)))
def test_l1_selection_keeps_the_nonzeros_and_the_minimums(raw, min_channels, round_to):
    alphas = [torch.tensor(a) for a in raw]
    keep = select_l1(alphas, min_channels=min_channels, round_to=round_to)
    assert [k.tolist() for k in keep] == [k.tolist() for k in select_l1(alphas, min_channels=min_channels,
                                                                          round_to=round_to)]
    for a, k in zip(alphas, keep, strict=True):
        nonzero = a != 0
        n, c = a.numel(), int(k.sum())
        assert bool((k | ~nonzero).all())  # every nonzero α is kept
        need = min(min_channels, n)
        if round_to is None:
            assert c == max(int(nonzero.sum()), need)
        else:
            assert c % round_to == 0 or c == n
        if int(nonzero.sum()) < need:  # the strongest channels fill the minimum
            kept_mags = a.abs()[k]
            dropped = a.abs()[~k]
            assert dropped.numel() == 0 or kept_mags.min() >= dropped.max()


@FAST
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=12), st.floats(0, 2, width=32))
def test_prox_l1_is_the_soft_threshold(vals, t):
    a = torch.tensor(vals)
    expected = torch.sign(a) * torch.clamp(a.abs() - t, min=0)
    for threshold in (t, torch.tensor(t)):
        got = [a.clone()]
        prox_l1_(got, threshold)
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)
        assert bool((got[0][a.abs() <= t] == 0).all())  # exactly zero, not tiny
    per_entry = torch.linspace(0, 2 * t, a.numel())  # one threshold per entry (search.shrink's losers)
    got = [a.clone()]
    prox_l1_(got, [per_entry])
    torch.testing.assert_close(got[0], torch.sign(a) * torch.clamp(a.abs() - per_entry, min=0), rtol=0, atol=1e-6)


class _Net(nn.Module):
    """conv-BN-ReLU stem, a residual bottleneck, then nothing, a plain conv block or a MobileNetV2-style inverted
    residual (1x1 expand, depthwise 3x3, 1x1 project), and a pooled linear head."""

    def __init__(self, c0, c1, c2, bias, extra):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1, bias=bias), nn.BatchNorm2d(c0), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(c0, c1, 1, bias=bias), nn.BatchNorm2d(c1), nn.ReLU(),
                                    nn.Conv2d(c1, c0, 3, padding=1, bias=bias), nn.BatchNorm2d(c0))
        self.kind = extra
        if extra == "plain":
            self.extra = nn.Sequential(nn.Conv2d(c0, c2, 3, padding=1, bias=bias), nn.ReLU(),
                                       nn.Conv2d(c2, c2, 3, stride=2, padding=1, bias=bias), nn.BatchNorm2d(c2),
                                       nn.ReLU())
        elif extra == "inverted":
            self.extra = nn.Sequential(nn.Conv2d(c0, c2, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU6(),
                                       nn.Conv2d(c2, c2, 3, padding=1, groups=c2, bias=False), nn.BatchNorm2d(c2),
                                       nn.ReLU6(), nn.Conv2d(c2, c0, 1, bias=False), nn.BatchNorm2d(c0))
        self.head = nn.Linear(c2 if extra == "plain" else c0, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.branch(x))
        if self.kind == "plain":
            x = self.extra(x)
        elif self.kind == "inverted":
            x = x + self.extra(x)
        return self.head(x.mean((2, 3)))


@NETS
@given(st.integers(2, 6), st.integers(1, 6), st.integers(2, 6), st.booleans(),
       st.sampled_from([None, "plain", "inverted"]), st.sampled_from(["internal", "coupled"]), st.floats(0.0, 0.7),
       st.integers(0, 2**16))
def test_fold_and_remove_preserve_outputs_on_random_nets(c0, c1, c2, bias, extra, scope, ratio, seed):
    """Eval-mode output of the slim net == the gated net's with the pruned α set to 0, for random widths, α, ratios."""
    torch.manual_seed(seed)
    model = _Net(c0, c1, c2, bias, extra)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 8, 8))  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    gates = attach_gates(model, x[:2], scope)
    assume(gates.groups)
    with torch.no_grad():
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape) * 2 - 0.5)  # some negative gates too
    total = sum(a.numel() for a in gates.alphas)
    assume(round(ratio * total) <= sum(a.numel() - 1 for a in gates.alphas))
    keep = select_ratio(gates.alphas, ratio)
    with torch.no_grad(), gates.masked(keep):
        reference = model(x)
    spec = remove_channels(gates, keep, check_input=x)
    out = model(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert spec["max_abs_diff"] <= 1e-5 * max(1.0, spec["max_abs_ref"])
    widths = {g["name"]: len(g["kept"]) for g in spec["groups"]}
    assert list(widths.values()) == [int(k.sum()) for k in keep]
    assert all(not m._forward_hooks for m in model.modules())
