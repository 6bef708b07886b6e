"""Width search blocks: gates on zoo/timm/torchvision models, exact removal, selection, save and reload."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import calibrated_bn

from slimrarts.models import create_model
from slimrarts.width import (
    ChannelGroup,
    ChannelSelect,
    CoverageWarning,
    attach_gates,
    load_slim,
    prox_l1_,
    prunable_channels,
    pruned_ratio,
    remove_channels,
    require_groups,
    save_slim,
    select_l1,
    select_ratio,
)


def _calibrated(name: str, size: int = 32) -> nn.Module:
    """A model with realistic BN statistics (a few train-mode passes) and non-trivial affine parameters."""
    torch.manual_seed(0)
    return calibrated_bn(create_model(name, num_classes=10), size, seed=None)


INVARIANT_CASES = [
    ("torchvision:resnet18", "internal"),
    ("torchvision:mobilenet_v2", "internal"),
    ("timm:resnet18", "internal"),
    ("timm:resnetv2_50", "branch-input"),
    ("timm:mobilenetv2_100", "internal"),
    ("timm:efficientnet_b0", "internal"),
    ("preresnet164", ("internal", "branch-input")),
    ("torchvision:resnet18", "coupled"),
    ("timm:efficientnet_b0", "coupled"),
    ("mobilenetv2_cifar", "internal"),
    ("resnet56", "internal"),
]


@pytest.mark.parametrize("name, scope", INVARIANT_CASES, ids=[f"{n}-{s if isinstance(s, str) else '+'.join(s)}"
                                                              for n, s in INVARIANT_CASES])
def test_removal_invariant(name, scope):
    """Slim model in eval mode == gated model with the pruned α set to 0 (fp32, within 1e-4)."""
    model = _calibrated(name)
    x = torch.randn(4, 3, 32, 32)
    params_before = sum(p.numel() for p in model.parameters())
    gates = attach_gates(model, x[:2], scope)
    assert gates.groups and not gates.skipped, gates.skipped
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) * 1.4 + 0.1)
    keep = select_ratio(gates.alphas, 0.4)
    spec = remove_channels(gates, keep, check_input=x)
    assert spec["max_abs_diff"] <= 1e-4 * max(1.0, spec["max_abs_ref"]), spec["max_abs_diff"]
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    foreign = {type(m).__module__ for m in model.modules() if type(m).__module__.startswith("slimrarts")}
    scopes = {scope} if isinstance(scope, str) else set(scope)
    if "branch-input" in scopes:
        assert any(isinstance(m, ChannelSelect) for m in model.modules())
        assert foreign <= {"slimrarts.width.surgery", "slimrarts.models.preresnet"}
    else:
        assert not any(isinstance(m, ChannelSelect) for m in model.modules())


def test_preresnet164_gates_every_bn_channel():
    """Internal + branch-input scope on PreResNet-164 gates exactly the BN channels Network Slimming prunes."""
    model = create_model("preresnet164")
    gates = attach_gates(model, torch.randn(2, 3, 32, 32), ["internal", "branch-input"])
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert gates.num_channels == bn_channels == 12112
    gated_sites = {s.module for g in gates.groups for s in g.sites}
    assert gated_sites == {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_gates_leave_model_parameters_alone_and_start_at_one():
    model = create_model("tiny_preresnet")
    n_params = len(list(model.parameters()))
    gates = attach_gates(model, torch.randn(2, 3, 32, 32), ["internal", "branch-input"])
    assert len(list(model.parameters())) == n_params
    assert all(torch.equal(a, torch.ones_like(a)) and a.requires_grad for a in gates.alphas)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    out = model(x)
    gates.remove()
    torch.testing.assert_close(model(x), out)


def test_gate_multiplies_the_norm_output():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    captured = {}
    model[2].register_forward_hook(lambda m, i, o: captured.setdefault("relu_in", i[0]))
    gates = attach_gates(model.eval(), torch.randn(1, 3, 8, 8), "internal")
    # the norm's group gates the norm; conv 3's (read by the linear through the flatten) gates the conv's output
    assert [s.module for g in gates.groups for s in g.sites] == ["1", "3"]
    with torch.no_grad():
        gates.alphas[0].copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]))
    x = torch.randn(1, 3, 8, 8)
    captured.clear()
    model(x)
    with gates.using([torch.ones(4)]):
        bn_out = model[1](model[0](x))
    torch.testing.assert_close(captured["relu_in"], bn_out * torch.tensor([0.0, 1.0, 2.0, -1.0]).view(1, -1, 1, 1))


def test_joint_norm_groups_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    gates = attach_gates(model, torch.randn(1, 3, 12, 12), "internal")
    assert [g.root for g in gates.groups] == ["3", "6"]
    assert len(gates.skipped) == 1 and "GroupNorm" in gates.skipped[0].reason


def test_untraceable_model_is_skipped_not_crashed():
    class Weird(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace me")

    weird = Weird()
    weird.p = nn.Parameter(torch.ones(1))
    gates = attach_gates(weird, torch.randn(1, 3, 8, 8))
    assert gates.groups == [] and "cannot trace me" in gates.skipped[0].reason


def test_ratio_selection_is_exact_and_respects_min_channels():
    g = torch.Generator().manual_seed(0)
    alphas = [torch.rand(n, generator=g) for n in (7, 16, 3, 40)]
    for ratio in (0.0, 0.1, 0.4, 0.6, 0.9):
        keep = select_ratio(alphas, ratio, min_channels=1)
        total = sum(a.numel() for a in alphas)
        assert sum(int((~k).sum()) for k in keep) == round(ratio * total)
        assert abs(pruned_ratio(keep) - ratio) <= 1 / total
        assert all(int(k.sum()) >= 1 for k in keep)
    keep = select_ratio([torch.zeros(4), torch.ones(8)], 0.5, min_channels=2)
    assert [int(k.sum()) for k in keep] == [2, 4]
    with pytest.raises(ValueError, match="min_channels"):
        select_ratio([torch.zeros(4), torch.zeros(4)], 0.9, min_channels=2)


def test_ratio_selection_prunes_smallest_magnitudes_and_breaks_ties_in_order():
    alphas = [torch.tensor([0.5, -0.1, 0.3]), torch.tensor([0.2, 0.2, -0.9])]
    keep = select_ratio(alphas, 0.5)
    assert keep[0].tolist() == [True, False, True] and keep[1].tolist() == [False, False, True]
    assert select_ratio([torch.ones(4), torch.ones(4)], 0.25)[0].tolist() == [False, False, True, True]


def test_ties_are_broken_by_position_in_large_groups_too():
    """Ties go by group order, then channel order, also past the sizes where an unstable sort would reorder them."""
    keep = select_ratio([torch.ones(150), torch.ones(150)], 0.25)
    assert torch.equal(keep[0], torch.arange(150) >= 75) and bool(keep[1].all())
    keep = select_ratio([torch.ones(200)], 0.5, round_to=8)  # 100 kept, rounded up to 104; tied channels come back
    assert torch.equal(keep[0], (torch.arange(200) < 4) | (torch.arange(200) >= 100))  # in channel order
    keep = select_l1([torch.zeros(200), torch.zeros(3)], min_channels=5)  # an all-zero group keeps its first channels
    assert torch.equal(keep[0], torch.arange(200) < 5) and bool(keep[1].all())


def test_selection_defaults_and_bad_settings():
    zeros = [torch.zeros(6), torch.tensor([0.0, 0.5, 0.0])]
    assert [k.tolist() for k in select_l1(zeros)] == [[True] + [False] * 5, [False, True, False]]  # min_channels=1
    assert [int(k.sum()) for k in select_ratio([torch.arange(1.0, 7.0)], 0.9)] == [1]  # 5 of 6 pruned, 1 kept
    for select in (lambda a, **kw: select_ratio(a, 0.5, **kw), select_l1):
        with pytest.raises(ValueError, match="round_to"):
            select(zeros, round_to=0)
        with pytest.raises(ValueError, match="min_channels"):
            select(zeros, min_channels=0)
        with pytest.raises(ValueError, match="no gated channels"):
            select([])
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio must be in"):
            select_ratio(zeros, ratio)


def test_round_to_rounds_kept_counts_up():
    keep = select_ratio([torch.arange(1.0, 17.0), torch.arange(1.0, 17.0)], 0.3, round_to=4)
    assert all(int(k.sum()) % 4 == 0 for k in keep)


def test_l1_selection_and_proximal_step():
    a = [torch.tensor([0.5, -0.05, 0.2]), torch.tensor([0.01, -0.02])]
    prox_l1_(a, torch.tensor(0.1))
    torch.testing.assert_close(a[0], torch.tensor([0.4, 0.0, 0.1]))
    torch.testing.assert_close(a[1], torch.tensor([0.0, 0.0]))
    keep = select_l1(a, min_channels=1)
    assert keep[0].tolist() == [True, False, True]
    assert int(keep[1].sum()) == 1  # min_channels keeps one channel of an all-zero group


def test_save_and_load_rebuild_the_slim_model(tmp_path):
    model = _calibrated("tiny_preresnet")
    x = torch.randn(3, 3, 32, 32)
    gates = attach_gates(model, x[:2], ["internal", "branch-input"])
    keep = select_ratio([torch.rand(a.shape) for a in gates.alphas], 0.5)
    spec = remove_channels(gates, keep, check_input=x)
    save_slim(tmp_path / "slim.pt", model, spec, {"name": "tiny_preresnet", "num_classes": 10})
    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert set(payload) == {"spec", "state_dict"}
    rebuilt = load_slim(tmp_path / "slim.pt", build=create_model)
    torch.testing.assert_close(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="pass the original model"):
        load_slim(tmp_path / "slim.pt")  # no model and no way to build one
    other = load_slim(tmp_path / "slim.pt", model=create_model("tiny_preresnet"))
    torch.testing.assert_close(other(x), model(x))
    with pytest.raises(ValueError, match="does not exist in this model"):
        load_slim(tmp_path / "slim.pt", model=create_model("tiny_resnet"))


def test_load_slim_rebuilds_class_count_and_arguments_and_refuses_pickles(tmp_path):
    """The factory gets the saved class count (10 when the info has none) and model arguments; a file whose model
    is not recorded needs model=; a payload holding a pickled object is refused (saved models are data)."""
    import argparse

    x = torch.randn(2, 3, 32, 32)
    for info, kwargs in (({"name": "tiny_resnet", "num_classes": 7, "kwargs": {"widths": (4, 8, 12)}},
                          {"num_classes": 7, "widths": (4, 8, 12)}), ({"name": "tiny_resnet"}, {})):
        torch.manual_seed(0)
        model = create_model("tiny_resnet", **kwargs).eval()
        spec = _remove_with_random_alphas(attach_gates(model, x, "internal"), x)[2]
        save_slim(tmp_path / "slim.pt", model, spec, info)
        torch.testing.assert_close(load_slim(tmp_path / "slim.pt", build=create_model)(x), model(x))
    for info in (None, {"num_classes": 10}):
        save_slim(tmp_path / "anon.pt", model, spec, info)
        with pytest.raises(ValueError, match="does not record which model"):
            load_slim(tmp_path / "anon.pt", build=create_model)
    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    torch.save(dict(payload, extra=argparse.Namespace(a=1)), tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="cannot be read .UnpicklingError"):
        load_slim(tmp_path / "pickled.pt", build=create_model)


def test_round_to_with_ties_keeps_multiples():
    keep = select_ratio([torch.ones(6)], 0.5, round_to=2)
    assert int(keep[0].sum()) == 4
    keep = select_ratio([torch.ones(7), torch.ones(5)], 0.5, round_to=4)  # ties prune group 0 first: 1 and 5 kept
    assert [int(k.sum()) for k in keep] == [4, 5]  # rounded up to a multiple of 4, capped at the group size


class _ChannelsLastMLP(nn.Module):
    """A ConvNeXt-style block: linear layers applied to NHWC activations (channels in the last dimension)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1, self.act, self.fc2 = nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


class _RepBlock(nn.Module):
    """RepVGG's training-time block: 3x3 and 1x1 branches plus an identity BN, summed; the BN ties input to output."""

    def __init__(self, c):
        super().__init__()
        self.k = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.p = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k(x) + self.p(x) + self.identity(x))


class _PartialResidual(nn.Module):
    """ReXNet's residual: the shortcut is added into the first channels of a slightly wider output."""

    def __init__(self, widths=(4, 5, 6, 7, 8, 9, 10)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
                                    for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            y = block(x)
            x = torch.cat([y[:, :x.shape[1]] + x, y[:, x.shape[1]:]], dim=1)
        return self.head(x.mean((2, 3)))


def _random_alphas_and_remove(model, x, scope):
    return _remove_with_random_alphas(attach_gates(model.eval(), x[:2], scope), x)


def _remove_with_random_alphas(gates, x):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) * 1.4 + 0.1)
    groups = list(gates.groups)
    spec = remove_channels(gates, select_ratio(gates.alphas, 0.4, repeats=gates.repeats), check_input=x)
    return groups, gates.skipped, spec


def test_linear_on_channels_last_activations_is_gated_on_the_last_dim():
    torch.manual_seed(0)
    model = _ChannelsLastMLP()
    groups, skipped, spec = _random_alphas_and_remove(model, torch.randn(4, 3, 7, 7), "internal")
    assert [(g.root, [s.dim for s in g.sites]) for g in groups] == [("fc1", [-1])] and not skipped
    assert model.fc1.out_features == model.fc2.in_features == 6
    assert spec["max_abs_diff"] <= 1e-5 * max(1.0, spec["max_abs_ref"])


def test_layers_that_read_and_write_one_group_need_gates_on_every_norm():
    """Two RepVGG blocks form one coupled group; the second block's convs read the first block's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), _RepBlock(6), _RepBlock(6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, 8, 8))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
    groups, _, spec = _random_alphas_and_remove(model, torch.randn(4, 3, 8, 8), "coupled")
    assert len(groups) == 1
    norms = {n for n, m in _RepBlock(6).named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {s.module for s in groups[0].sites} == {"1"} | {f"{b}.{n}" for b in (3, 4) for n in norms}
    assert model[7].in_features == 4
    assert spec["max_abs_diff"] <= 1e-5 * max(1.0, spec["max_abs_ref"])


def test_partial_channel_residual_is_skipped_not_hung():
    """torch-pruning's group search never ended on ReXNet-style residuals; those groups are skipped with a reason."""
    with pytest.warns(CoverageWarning):
        gates = attach_gates(_PartialResidual().eval(), torch.randn(2, 3, 8, 8), "internal")
    assert gates.skipped and all("slice" in s.reason or "did not converge" in s.reason for s in gates.skipped)


ZOO = ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
       "torchvision:regnet_x_400mf", "torchvision:densenet121", "torchvision:shufflenet_v2_x0_5",
       "torchvision:convnext_tiny", "torchvision:squeezenet1_0", "torchvision:mnasnet0_5", "timm:rexnet_100",
       "timm:repvgg_a0", "timm:convnext_atto", "timm:ese_vovnet19b_dw", "timm:cspresnet50", "timm:dla34",
       "timm:mixnet_s", "timm:tf_efficientnetv2_b0", "timm:resnest14d", "timm:seresnet18", "timm:res2net50_14w_8s",
       "timm:ghostnet_100", "timm:regnety_002",
       # grouped convs, dual paths, re-parameterisable branches, global response norm (issue 14)
       "torchvision:resnext50_32x4d", "torchvision:regnet_y_400mf", "timm:seresnext26d_32x4d", "timm:regnetx_002",
       "timm:dpn68", "timm:mobileone_s0", "timm:convnextv2_atto"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_are_gated_or_skipped_and_removal_is_exact(name):
    """Every zoo CNN either gets gates whose removal is exact or says why not; nothing crashes, hangs or is silent.

    benchmarks/zoo_coverage.py reports, for the same models, how far a cut to min_channels reaches (MACs).
    """
    x = torch.randn(2, 3, 64, 64)
    for scope in ("internal", "coupled"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoverageWarning)
            gates = attach_gates(_calibrated(name, size=64), x[:1], scope)
        assert gates.groups or gates.skipped or gates.out_of_scope, (scope, "nothing gated and nothing said")
        assert all(s.reason for s in gates.skipped + gates.out_of_scope)
        if not gates.groups:
            with pytest.raises(ValueError, match="nothing to prune"):
                require_groups(gates)
            continue
        _, _, spec = _remove_with_random_alphas(gates, x)
        assert spec["max_abs_diff"] <= 1e-4 * max(1.0, spec["max_abs_ref"]), (scope, spec["max_abs_diff"])


def test_slim_model_with_input_selection_exports_with_torch_export():
    """The slim model (ChannelSelect included) is plain torch code: torch.export traces it and agrees with it."""
    torch.manual_seed(0)
    model = create_model("tiny_preresnet").eval()
    x = torch.randn(2, 3, 32, 32)
    _remove_with_random_alphas(attach_gates(model, x, ["internal", "branch-input"]), x)
    assert any(isinstance(m, ChannelSelect) for m in model.modules())
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_ratio_selection_counts_channels_of_tied_entries():
    """With repeats (an α entry gating several channels: grouped convs) ratio, min_channels, round_to count channels."""
    alphas = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.2, 0.8])]  # 4 entries x 8 channels, 2 x 1
    keep = select_ratio(alphas, 0.25, repeats=[8, 1])  # 34 channels, target 8 or 9: one entry of group 0 (8)
    assert keep[0].tolist() == [False, True, True, True] and keep[1].tolist() == [True, True]
    assert pruned_ratio(keep, [8, 1]) == pytest.approx(8 / 34)
    assert pruned_ratio(keep) == pytest.approx(1 / 6)  # counted per entry without repeats
    assert pruned_ratio([]) == 0.0 and pruned_ratio([torch.ones(0, dtype=torch.bool)]) == 0.0  # nothing gated
    ordered = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.9, 0.8])]
    keep = select_ratio(ordered, 0.5, repeats=[8, 1], min_channels=16)  # target 17: group 0 keeps 2 entries = 16
    assert [int(k.sum()) for k in keep] == [2, 2]
    keep = select_ratio(alphas, 0.6, repeats=[8, 1], round_to=24)  # group 0 keeps 2 entries, rounded up to 3 (24)
    assert int(keep[0].sum()) == 3
    assert prunable_channels([ChannelGroup("a", "internal", 32, [], "a", [], repeat=8),
                              ChannelGroup("b", "internal", 2, [], "b", [])], min_channels=4) == 24 + 0
    with pytest.raises(ValueError, match="repeats"):
        select_ratio(alphas, 0.5, repeats=[8])


@pytest.mark.parametrize("bad", [[8], [8, 0], [8, True], [8.0, 1], [8, 1, 1]])
def test_one_repeats_check_for_every_selection(bad):
    """`select_ratio`, `pruned_ratio` and `min_kept`/`select_budget` read `repeats` through one check: one int >= 1
    per group (numpy and torch integers too); the error names the argument as the caller spelled it."""
    import numpy as np

    from slimrarts.width.select import check_repeats

    assert check_repeats(2, None) == [1, 1]
    assert check_repeats(2, [np.int64(8), torch.tensor(2)]) == [8, 2]
    with pytest.raises(ValueError, match=r"^repeats must hold one int >= 1 per group \(2 groups\)"):
        pruned_ratio([torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)], bad)
    with pytest.raises(ValueError, match=r"^repeat must hold one int >= 1 per group"):
        check_repeats(2, bad, "repeat")


def test_ratio_selection_with_repeats_stops_closest_to_the_target():
    alphas = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.15])]  # entries of 10, 10, 10 and 1 channel: 31
    keep = select_ratio(alphas, 0.2, repeats=[10, 1])  # target 6: 0 or 10 pruned; 10 is closer (|4| < |6|)
    assert keep[0].tolist() == [False, True, True] and keep[1].tolist() == [True]
    keep = select_ratio(alphas, 0.1, repeats=[10, 1])  # target 3: 0 is closer than 10
    assert all(bool(k.all()) for k in keep)


def test_l1_selection_with_repeats_keeps_min_channels():
    keep = select_l1([torch.zeros(4), torch.tensor([0.0, 1.0])], min_channels=9, repeats=[4, 1])
    assert [int(k.sum()) for k in keep] == [3, 2]  # ceil(9/4) = 3 entries = 12 channels; group 1 has only 2


def test_load_slim_traces_at_the_input_size_of_the_spec(tmp_path):
    """A net that only runs at its own input size (a linear layer on flattened 16x16 maps) is rebuilt from its spec;
    a spec without an input size falls back to CIFAR's 3x32x32."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                             nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval()

    model = net()
    x = torch.randn(2, 3, 16, 16)
    spec = _remove_with_random_alphas(attach_gates(model, x, "internal"), x)[2]
    assert spec["input_shape"] == [2, 3, 16, 16]
    save_slim(tmp_path / "slim.pt", model, spec)
    torch.testing.assert_close(load_slim(tmp_path / "slim.pt", model=net())(x), model(x))
    cifar = _calibrated("tiny_resnet")
    x = torch.randn(2, 3, 32, 32)
    spec = _remove_with_random_alphas(attach_gates(cifar, x, "internal"), x)[2]
    from slimrarts.width import apply_spec

    rebuilt = apply_spec(_calibrated("tiny_resnet"), dict(spec, input_shape=None))
    rebuilt.load_state_dict(cifar.state_dict())
    torch.testing.assert_close(rebuilt(x), cifar(x))


def test_remove_channels_spec_and_training_flag():
    """The spec names each group (scope, root, size, kept indices), every layer's widths before and after, the input
    shape and the check's figures; the model comes back in the mode it was in, without hooks."""
    model = _calibrated("tiny_preresnet").train()
    x = torch.randn(3, 3, 32, 32)
    gates = attach_gates(model, x[:2], ["internal", "branch-input"])
    groups = list(gates.groups)
    keep = select_ratio([torch.rand(a.shape, generator=torch.Generator().manual_seed(2)) for a in gates.alphas], 0.5)
    with torch.no_grad(), gates.masked(keep):
        model.eval()
        reference = model(x)
        model.train()
    spec = remove_channels(gates, keep, check_input=x)
    assert model.training
    assert spec["format"] == 1 and spec["input_shape"] == [2, 3, 32, 32]
    assert [(g["name"], g["scope"], g["root"], g["size"]) for g in spec["groups"]] == [
        (g.name, g.scope, g.root, g.size) for g in groups]
    assert [g["kept"] for g in spec["groups"]] == [torch.nonzero(k).flatten().tolist() for k in keep]
    modules = dict(model.named_modules())
    for name, w in spec["layers"].items():
        m = modules[name]
        if isinstance(m, nn.Sequential):  # a pruned branch entrance is now (ChannelSelect, norm)
            assert isinstance(m[0], ChannelSelect)
            m = m[1]
        after = [m.in_channels, m.out_channels] if isinstance(m, nn.Conv2d) else (
            [m.in_features, m.out_features] if isinstance(m, nn.Linear) else [m.num_features] * 2)
        assert w["after"] == after, name
    assert any(w["before"] != w["after"] for w in spec["layers"].values())
    assert spec["max_abs_ref"] == pytest.approx(reference.abs().max().item())
    assert spec["max_abs_diff"] <= 1e-4 * spec["max_abs_ref"]
    with pytest.raises(ValueError, match="masks for"):
        remove_channels(attach_gates(_calibrated("tiny_resnet"), x[:2]), [])
    other = ChannelSelect(torch.tensor([2, 0]))
    assert torch.equal(other(torch.arange(12.0).view(1, 3, 2, 2)), torch.arange(12.0).view(1, 3, 2, 2)[:, [2, 0]])
    assert other.extra_repr() == "2 channels"


def test_grouped_conv_keeps_must_repeat_in_every_block():
    from slimrarts.width.surgery import _check_tiled

    tiled = ChannelGroup("g", "internal", 8, [], "g", [], repeat=2)  # 2 blocks of 4 channels, α of 4 entries
    _check_tiled(tiled, [0, 2, 4, 6])  # positions 0 and 2 of each block
    _check_tiled(tiled, [6, 2, 4, 0])  # in any order
    for bad in ([0, 2, 4, 7], [0, 2, 4], [1, 5, 6]):
        with pytest.raises(ValueError, match="same positions in each of its 2 blocks of 4 channels"):
            _check_tiled(tiled, bad)
    _check_tiled(ChannelGroup("p", "internal", 8, [], "p", []), [0, 3, 7])  # repeat 1: any channels


def test_l1_selection_keeps_at_least_min_kept_entries():
    alphas = [torch.tensor([0.0, 0.4, 0.0, 0.0, 0.9, 0.0]), torch.tensor([0.0, 0.2, 0.3])]
    keep = select_l1(alphas, min_kept=[3, 1])
    assert keep[0].tolist() == [True, True, False, False, True, False]  # the zero at 0 wins the tie by position
    assert keep[1].tolist() == [False, True, True]
    assert [k.tolist() for k in select_l1(alphas)] == [[False, True, False, False, True, False], [False, True, True]]


def test_load_slim_says_which_weights_do_not_fit(tmp_path):
    model = _calibrated("tiny_preresnet")
    x = torch.randn(3, 3, 32, 32)
    gates = attach_gates(model, x[:2], ["internal"])
    spec = remove_channels(gates, select_ratio([torch.rand(a.shape) for a in gates.alphas], 0.5), check_input=x)
    save_slim(tmp_path / "slim.pt", model, spec, {"name": "tiny_preresnet", "num_classes": 10})
    payload = torch.load(tmp_path / "slim.pt", weights_only=True)
    weights = payload["state_dict"]
    dropped = [k for k in weights if not k.endswith("num_batches_tracked")][:6]  # BN refills a missing counter
    torch.save(dict(payload, state_dict={k: v for k, v in weights.items() if k not in dropped}), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="do not fit the model cut to its width spec") as err:
        load_slim(tmp_path / "m.pt", build=create_model)
    assert f"(missing {dropped[:5]}, unexpected [])" in str(err.value)  # the first five, by name
    key = next(k for k in weights if k.endswith("conv1.weight"))
    torch.save(dict(payload, state_dict=dict(weights, **{key: torch.zeros(1, 1, 1, 1)})), tmp_path / "s.pt")
    with pytest.raises(ValueError, match=f"size mismatch for {key}") as err:
        load_slim(tmp_path / "s.pt", build=create_model)
    assert "Error(s) in loading" not in str(err.value)  # torch's first line is dropped, the mismatch is kept
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(Exception, match="this slim model cannot be read .* re-run the pruning that wrote it"):
        load_slim(tmp_path / "bad.pt", build=create_model)


def test_ratio_selection_drops_an_overshooting_entry_when_that_is_closer():
    """With repeats the walk can overshoot the target by a whole entry; the last entry is dropped when stopping
    before it lands closer (or as close) to the target."""
    alphas = [torch.tensor([0.5, 0.9]), torch.tensor([0.01, 0.02, 0.03, 0.04])]  # 2 entries x 8 channels, 4 x 1
    keep = select_ratio(alphas, 4 / 20, repeats=[8, 1])  # target 4: 3 (group 1 keeps its 1) beats 3 + 8 = 11
    assert keep[0].tolist() == [True, True] and keep[1].tolist() == [False, False, False, True]
    keep = select_ratio(alphas, 8 / 20, repeats=[8, 1])  # target 8: 11 overshoots by 3, 3 falls short by 5
    assert keep[0].tolist() == [False, True] and keep[1].tolist() == [False, False, False, True]
