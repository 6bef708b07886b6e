"""Width search on the families issue 14 found out of reach: grouped convs (ResNeXt, RegNet, DPN), channel shuffle and
split (ShuffleNetV2), dual-path concatenations (DPN), and models that used to come back with nothing said."""

from __future__ import annotations

import warnings
from importlib.metadata import version

import pytest
import torch
import torch.nn as nn
from conftest import TinyGrouped, calibrated_bn

from slimrarts.models import create_model
from slimrarts.width import (
    CoverageWarning,
    apply_spec,
    attach_gates,
    coverage,
    load_slim,
    pruned_ratio,
    remove_channels,
    require_groups,
    save_slim,
    select_ratio,
)


def _cut(gates, x, ratio=0.4):
    """Random α in [0.1, 1.5], prune `ratio` of the gated channels, remove; returns (keep, spec)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) * 1.4 + 0.1)
    keep = select_ratio(gates.alphas, ratio, repeats=gates.repeats)
    return keep, remove_channels(gates, keep, check_input=x)


def _exact(spec) -> bool:
    return spec["max_abs_diff"] <= 1e-4 * max(1.0, spec["max_abs_ref"])


def _grouped_convs_are_whole(model: nn.Module) -> None:
    """Every grouped conv still has equal-width groups: weight (out, in/groups, k...) with both divisible."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0, name
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups), name




def test_tiny_grouped_conv_is_cut_exactly_with_equal_widths_per_group():
    model = calibrated_bn(TinyGrouped(), 16)
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    gates = attach_gates(model, x[:2], "internal")
    assert [(g.root, g.size, g.repeat, len(a)) for g, a in zip(gates.groups, gates.alphas, strict=True)] == [
        ("a.0", 16, 4, 4), ("b.0", 32, 4, 8)]  # conv groups of 4 inputs / 8 outputs: one α per position
    assert not gates.skipped and gates.num_channels == 48
    keep, spec = _cut(gates, x)
    assert _exact(spec), spec["max_abs_diff"]
    assert pruned_ratio(keep, gates.repeats) == pytest.approx(20 / 48)  # round(0.4 · 48) = 19: 5 entries of 4
    _grouped_convs_are_whole(model)
    b = model.b[0]
    assert b.groups == 4 and b.in_channels == 4 * int(keep[0].sum()) and b.out_channels == 4 * int(keep[1].sum())
    # the same input positions survive in every conv group: the slim weight is the old one at those positions
    rows = torch.nonzero(keep[1].repeat(4)).flatten()
    cols = torch.nonzero(keep[0]).flatten()
    torch.testing.assert_close(b.weight, reference["b.0.weight"][rows][:, cols])


def test_channels_read_by_grouped_convs_of_different_group_counts_share_positions_of_both():
    """24 channels read by a conv with 4 groups (blocks of 6) and one with 6 groups (blocks of 4): α has 2 entries."""

    class TwoGroupings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
            self.b4 = nn.Conv2d(24, 8, 3, padding=1, groups=4)
            self.b6 = nn.Conv2d(24, 12, 3, padding=1, groups=6)
            self.head = nn.Linear(20, 3)

        def forward(self, x):
            y = self.a(x)
            return self.head(torch.cat([self.b4(y), self.b6(y)], 1).mean((2, 3)))

    model = calibrated_bn(TwoGroupings(), 8)
    x = torch.randn(3, 3, 8, 8)
    gates = attach_gates(model, x[:1], "internal", warn=False)
    assert [(g.root, g.repeat, len(a)) for g, a in zip(gates.groups, gates.alphas, strict=True)] == [("a.0", 12, 2)]
    _, spec = _cut(gates, x, ratio=0.5)
    assert _exact(spec) and model.b4.in_channels == model.b6.in_channels == 12
    _grouped_convs_are_whole(model)


def test_grouped_width_spec_round_trips_and_rejects_untiled_kept(tmp_path):
    model = calibrated_bn(TinyGrouped(), 16)
    x = torch.randn(2, 3, 16, 16)
    _, spec = _cut(attach_gates(model, x, "internal"), x)
    assert [g["repeat"] for g in spec["groups"]] == [4, 4]
    save_slim(tmp_path / "slim.pt", model, spec)
    rebuilt = load_slim(tmp_path / "slim.pt", model=TinyGrouped())
    torch.testing.assert_close(rebuilt(x), model(x))
    untiled = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 15]  # positions 0-2 kept in three conv groups, 0, 1, 3 in one
    bad = dict(spec, groups=[dict(spec["groups"][0], kept=untiled)] + spec["groups"][1:])
    with pytest.raises(ValueError, match="same positions"):
        apply_spec(TinyGrouped(), bad)


def test_keep_masks_must_match_alpha_length():
    model = TinyGrouped().eval()
    gates = attach_gates(model, torch.randn(1, 3, 8, 8), "internal")
    with pytest.raises(ValueError, match="entry_scores"):
        remove_channels(gates, [torch.ones(16, dtype=torch.bool), torch.ones(32, dtype=torch.bool)])
    per_channel = [torch.arange(16.0), torch.arange(32.0)]
    scores = gates.entry_scores(per_channel)
    assert scores[0].tolist() == [6.0, 7.0, 8.0, 9.0]  # mean over the 4 conv groups of each position


def _bottleneck_channels(model: nn.Module, first: str, second: str) -> dict[str, int]:
    """Out-channels of the first two convs (`first`, `second`, paths inside the block) of every block."""
    out = {}
    for name, m in model.named_modules():
        convs = [_submodule(m, child) for child in (first, second)]
        if all(isinstance(c, nn.Conv2d) for c in convs):
            out.update({f"{name}.{child}": c.out_channels for child, c in zip((first, second), convs, strict=True)})
    return out


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


BOTTLENECKS = [
    pytest.param("torchvision:regnet_x_400mf", "f.a.0", "f.b.0", marks=pytest.mark.slow),
    pytest.param("torchvision:resnext50_32x4d", "conv1", "conv2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, first, second", BOTTLENECKS)
def test_grouped_bottlenecks_are_gated_and_cut_exactly(name, first, second):
    """ResNeXt / RegNetX: >= 90% of the channels around the grouped conv are gated; a 40% cut is exact."""
    model = calibrated_bn(create_model(name, num_classes=10), 32)
    x = torch.randn(4, 3, 32, 32)
    bottleneck = _bottleneck_channels(model, first, second)
    assert len(bottleneck) >= 2 * 16
    gates = attach_gates(model, x[:1], "internal")
    gated = {g.root: g.size for g in gates.groups}
    assert sum(gated.get(n, 0) for n in bottleneck) >= 0.9 * sum(bottleneck.values())
    assert any(g.repeat > 1 for g in gates.groups)
    keep, spec = _cut(gates, x)
    assert abs(pruned_ratio(keep, gates.repeats) - 0.4) < 0.01
    assert _exact(spec), spec["max_abs_diff"]
    _grouped_convs_are_whole(model)


def test_shufflenet_v2_gates_each_branch_first_1x1_and_depthwise_channels_exactly():
    """Every block's branch2: 1x1 conv → BN → ReLU → depthwise 3x3 → BN → 1x1 is one internal group (the chunk,
    concat and channel shuffle around it are skipped with reasons: they tie channels across blocks)."""
    model = calibrated_bn(create_model("torchvision:shufflenet_v2_x0_5", num_classes=10), 32)
    x = torch.randn(4, 3, 32, 32)
    gates = attach_gates(model, x[:1], "internal", warn=False)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "InvertedResidual"]
    assert len(blocks) == 16
    for block in blocks:  # the first 1x1's outputs and the depthwise conv's channels: one gated group
        group, = (g for g in gates.groups if f"{block}.branch2.0" in g.members and f"{block}.branch2.3" in g.members)
        assert group.size == model.get_submodule(f"{block}.branch2.3").out_channels == group.num_alphas
        assert {s.module for s in group.sites} == {f"{block}.branch2.4"}  # the BN after the depthwise conv
    assert all(s.reason for s in gates.skipped + gates.out_of_scope)
    assert any("shuffle" in s.reason for s in gates.skipped)
    _, spec = _cut(gates, x)
    assert _exact(spec), spec["max_abs_diff"]


@pytest.mark.slow
def test_dpn68_is_traced_and_its_grouped_conv_inputs_are_gated():
    model = calibrated_bn(create_model("timm:dpn68", num_classes=10), 32)
    x = torch.randn(4, 3, 32, 32)
    gates = attach_gates(model, x[:1], "internal", warn=False)
    assert not any("tracing failed" in s.reason for s in gates.skipped)
    grouped = {n: m.in_channels for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}
    assert len(grouped) >= 20
    gated = sum(g.size for g in gates.groups for n in grouped if n in g.members and g.repeat > 1 and g.root != n)
    assert gated >= 0.5 * sum(grouped.values())
    _, spec = _cut(gates, x)
    assert _exact(spec), spec["max_abs_diff"]
    _grouped_convs_are_whole(model)


class _GRNBlock(nn.Module):
    """ConvNeXt-V2's MLP: 1x1 → GELU → global response norm → 1x1 (GRN mixes the channels through their mean)."""

    def __init__(self):
        super().__init__()
        from timm.layers.grn import GlobalResponseNorm

        self.fc1, self.act, self.fc2 = nn.Conv2d(3, 16, 1), nn.GELU(), nn.Conv2d(16, 4, 1)
        self.grn = GlobalResponseNorm(16, channels_last=False)

    def forward(self, x):
        return self.fc2(self.grn(self.act(self.fc1(x)))).mean((2, 3))


class _RepBranches(nn.Module):
    """MobileOne's training-time block: k conv branches and a 1x1 branch summed; every channel is coupled."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.k = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                               for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(sum(k(x) for k in self.k) + x)
        return self.head(x.mean((2, 3)))


def test_models_with_nothing_gateable_are_never_silent_and_prune_fails_with_reasons():
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(CoverageWarning, match="global response norm"):
        grn = attach_gates(_GRNBlock().eval(), x, "internal")
    assert not grn.groups and any("grn.weight" in s.reason or "grn.bias" in s.reason for s in grn.skipped)
    with pytest.raises(ValueError, match="grn"):
        require_groups(grn)

    rep = attach_gates(_RepBranches().eval(), x, "internal")
    assert not rep.groups and not rep.skipped and rep.out_of_scope
    with pytest.raises(ValueError, match="scope 'coupled' gates them"):
        require_groups(rep)
    assert attach_gates(_RepBranches().eval(), x, "coupled").groups  # the scope it names does gate them

    head_only = nn.Sequential(nn.Conv2d(3, 4, 8), nn.Flatten())
    with pytest.raises(ValueError, match="no conv or linear layer with prunable outputs"):
        require_groups(attach_gates(head_only, x, "internal"))


def test_skipped_groups_raise_one_warning_with_channels_and_macs_share():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gates = attach_gates(model, torch.randn(1, 3, 12, 12), "internal")
    coverage_warnings = [w for w in caught if issubclass(w.category, CoverageWarning)]
    assert len(coverage_warnings) == 1 and len(gates.skipped) == 1
    text = str(coverage_warnings[0].message)
    # conv 0 (3·8·9 per pixel, 10x10) and conv 3 (8·8·9, 8x8) read or write the GroupNorm's channels
    macs = {"0": 100 * 3 * 8 * 9, "3": 64 * 8 * 8 * 9, "6": 64 * 8 * 4, "9": 4 * 2}
    assert "8 channels in 1 channel group" in text and f"{(macs['0'] + macs['3']) / sum(macs.values()):.0%}" in text
    assert coverage_warnings[0].filename == __file__  # points at the caller of attach_gates
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        attach_gates(TinyGrouped().eval(), torch.randn(1, 3, 8, 8), "internal")  # nothing skipped: no warning


def test_coverage_is_the_macs_reduction_of_a_real_cut_to_min_channels():
    from slimrarts.metrics import count_macs

    model = TinyGrouped().eval()
    x = torch.randn(2, 3, 16, 16)
    report = coverage(model, x, "internal")
    assert report["gated_channels"] == 48 and report["grouped_groups"] == 2 and report["skipped_groups"] == 0
    assert _exact(report) and report["macs"] == count_macs(model, example_inputs=x[:1])  # the model is untouched
    slim = TinyGrouped().eval()
    slim.a[0] = nn.Conv2d(16, 4, 1, bias=False)  # min_channels=1: one α entry = 4 channels (one per conv group)
    slim.a[1] = nn.BatchNorm2d(4)
    slim.b[0] = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    slim.b[1] = nn.BatchNorm2d(4)
    slim.c[0] = nn.Conv2d(4, 16, 1, bias=False)
    assert report["macs_min"] == count_macs(slim, example_inputs=x[:1])
    assert report["macs_reduction"] == pytest.approx(1 - report["macs_min"] / report["macs"])


def test_torch_pruning_internals_we_wrap_exist():
    """slimrarts.width.trace patches two torch-pruning internals; this pins what it relies on (tested with 1.6.1)."""
    from torch_pruning.dependency import graph as tp_graph
    from torch_pruning.dependency import index_mapping

    from slimrarts.width import trace

    assert tuple(int(v) for v in version("torch-pruning").split(".")[:2]) == (1, 6), \
        "re-check slimrarts/width/trace.py against this torch-pruning version"
    assert callable(index_mapping.update_index_mapping) and tp_graph.index_mapping is index_mapping
    assert all(callable(getattr(index_mapping, name)) for name in trace._UPDATERS.values())
    assert callable(tp_graph.Group.add_dep)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    assert list(x.view(1, 3, 16).grad_fn._input_metadata[0].shape) == [1, 3, 16]  # reshape_problem's output shape
    original = index_mapping.update_index_mapping
    with trace.tolerant_mapping():
        assert index_mapping.update_index_mapping is not original
    assert index_mapping.update_index_mapping is original
