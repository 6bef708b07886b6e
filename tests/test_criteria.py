"""One-shot criteria: each score equals its definition computed by hand on planted weights, and selects exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimrarts.baselines.criteria import (
    NORMALIZER,
    TAYLOR_BATCHES,
    criterion_info,
    criterion_scores,
    list_criteria,
    score_channels,
)
from slimrarts.models import create_model
from slimrarts.width import attach_gates, remove_channels, select_ratio

CRITERIA = ["fpgm", "group-norm", "l1", "taylor"]


class Chain(nn.Module):
    """conv1 → relu → conv2 → [bn] → relu → pool → fc: two internal groups (conv1: 5 channels, conv2: 6)."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.bn(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


class Residual(nn.Module):
    """stem → bn0 → relu = h; relu(h + bn1(conv1(h))) → head: stem and conv1 are coupled through the add."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head, self.bn2 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn1(self.conv1(h)))
        return self.fc(torch.relu(self.bn2(self.head(h))).mean((2, 3)))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _gates(model: nn.Module, scope="internal", size: int = 8):
    return attach_gates(model, torch.randn(2, 3, size, size), scope)


def _by_name(gates) -> dict[str, int]:
    return {g.name: i for i, g in enumerate(gates.groups)}


def _norm(raw: torch.Tensor) -> torch.Tensor:
    return raw / raw.mean()  # torch-pruning's "mean" normaliser


def _batches(n: int, size: int = 8, classes: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(n)]


def test_info_table_names_papers_and_needs():
    assert list_criteria() == CRITERIA
    assert NORMALIZER == "mean"
    needs = {n: (criterion_info(n).needs_grad, criterion_info(n).needs_data) for n in CRITERIA}
    assert needs == {"l1": (False, False), "fpgm": (False, False), "group-norm": (False, False),
                     "taylor": (True, True)}
    for name, year in [("l1", "2017"), ("taylor", "2019"), ("fpgm", "2019"), ("group-norm", "2023")]:
        info = criterion_info(name)
        assert year in info.source and "Importance" in info.importance and name in info.note


def test_l1_is_the_filter_l1_norm_of_the_producing_conv():
    model = _randomise(Chain())
    planted = torch.tensor([3.0, 0.5, 2.0, 1.0, 4.0])
    with torch.no_grad():  # filter c: entries ±planted[c] / 27, so its L1 norm is planted[c]
        signs = torch.sign(torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(3)))
        model.conv1.weight.copy_(signs * (planted / 27).view(5, 1, 1, 1))
    gates = _gates(model)
    idx = _by_name(gates)
    scores = criterion_scores("l1", gates)
    # only conv1's filters count: conv2's input slices (the consumer) do not
    torch.testing.assert_close(scores[idx["conv1"]], _norm(planted))
    assert scores[idx["conv1"]].argsort().tolist() == [1, 3, 2, 0, 4]
    torch.testing.assert_close(scores[idx["conv2"]], _norm(model.conv2.weight.detach().abs().sum((1, 2, 3))))


def test_l1_of_a_coupled_group_averages_its_producers_filters():
    model = _randomise(Residual())
    gates = _gates(model, "coupled")
    i = [g.scope for g in gates.groups].index("coupled")
    raw = (model.stem.weight.abs().sum((1, 2, 3)) + model.conv1.weight.abs().sum((1, 2, 3))).detach() / 2
    torch.testing.assert_close(criterion_scores("l1", gates)[i], _norm(raw))


def test_fpgm_gives_the_geometric_median_filter_the_lowest_score():
    model = _randomise(Chain())
    g = torch.Generator().manual_seed(5)
    m, a, b = torch.rand(27, generator=g) + 2.0, torch.rand(27, generator=g) - 0.5, torch.rand(27, generator=g) - 0.5
    filters = torch.stack([m + a, m - a, m, m + b, m - b])  # filter 2 is the geometric median of the others
    with torch.no_grad():
        model.conv1.weight.copy_(filters.view(5, 3, 3, 3))
    gates = _gates(model)
    scores = criterion_scores("fpgm", gates)[_by_name(gates)["conv1"]]
    raw = torch.stack([sum((fi - fj).norm() for fj in filters) for fi in filters])  # He et al.: Σ_j ‖F_i − F_j‖₂
    torch.testing.assert_close(scores, _norm(raw))
    assert int(scores.argmin()) == 2


def test_group_norm_sums_squared_weights_over_every_coupled_layer():
    """DepGraph: a channel's importance is the squared L2 norm of all its parameters in the group (conv rows,
    consumer input slices, BN γ), here mean-reduced over the 6 layers and mean-normalised."""
    model = _randomise(Residual())
    gates = _gates(model, "coupled")
    i = [g.scope for g in gates.groups].index("coupled")
    def sq(w, dims):
        return w.detach().pow(2).sum(dims)
    raw = (sq(model.stem.weight, (1, 2, 3)) + model.bn0.weight.detach() ** 2 + sq(model.conv1.weight, (0, 2, 3))
           + sq(model.conv1.weight, (1, 2, 3)) + model.bn1.weight.detach() ** 2 + sq(model.head.weight, (0, 2, 3)))
    torch.testing.assert_close(criterion_scores("group-norm", gates)[i], _norm(raw / 6))
    # an internal group: conv2's rows, its BN γ and the classifier's input columns
    model = _randomise(Chain())
    gates = _gates(model)
    raw = sq(model.conv2.weight, (1, 2, 3)) + model.bn.weight.detach() ** 2 + sq(model.fc.weight, 0)
    torch.testing.assert_close(criterion_scores("group-norm", gates)[_by_name(gates)["conv2"]], _norm(raw))


def test_branch_input_groups_score_the_entrance_norm_and_its_consumers():
    """A branch-input group removes the entrance BN's channels and its consumers' input slices, nothing else."""
    torch.manual_seed(0)
    model = _randomise(create_model("tiny_preresnet"))
    gates = _gates(model, ["internal", "branch-input"], size=32)
    i = _by_name(gates)["input:layer1.1.bn1"]
    assert gates.groups[i].consumers == ["layer1.1.conv1"]
    gamma, w = model.layer1[1].bn1.weight.detach(), model.layer1[1].conv1.weight.detach()
    torch.testing.assert_close(criterion_scores("group-norm", gates)[i], _norm(gamma ** 2 + w.pow(2).sum((0, 2, 3))))
    torch.testing.assert_close(criterion_scores("l1", gates)[i], _norm(w.abs().sum((0, 2, 3))))
    cols = w.abs().transpose(0, 1).flatten(1)  # FPGM on the consumer's input slices
    raw = torch.stack([sum((ci - cj).norm() for cj in cols) for ci in cols])
    torch.testing.assert_close(criterion_scores("fpgm", gates)[i], _norm(raw))


def _hand_taylor(model: Chain, batches) -> dict[str, torch.Tensor]:
    """Molchanov's first-order |Σ_s g_s·w_s| per layer slice of a channel, averaged over the group's layers, with
    g the gradient of the mean loss over the batches in eval mode; computed on a copy with plain autograd."""
    ref = Chain(bn=isinstance(model.bn, nn.BatchNorm2d))
    ref.load_state_dict(model.state_dict())
    ref.eval()
    for x, y in batches:
        (F.cross_entropy(ref(x), y) / len(batches)).backward()
    wg = {n: (p.detach() * p.grad) for n, p in ref.named_parameters()}
    conv1 = (wg["conv1.weight"].sum((1, 2, 3)).abs() + wg["conv2.weight"].sum((0, 2, 3)).abs()) / 2
    conv2 = (wg["conv2.weight"].sum((1, 2, 3)).abs() + wg["fc.weight"].sum(0).abs()) / 2
    return {"conv1": _norm(conv1), "conv2": _norm(conv2)}


def test_taylor_matches_hand_gradients_and_a_dead_channel_scores_zero():
    model = _randomise(Chain(bn=False))
    with torch.no_grad():
        model.conv1.weight[3].zero_()  # channel 3 of conv1: zero filter, zero activation, zero gradient downstream
    gates = _gates(model)
    with torch.no_grad():  # the search's α must not matter: Taylor scores the dense model with the gates at 1
        for a in gates.alphas:
            a.uniform_(0.1, 2.0)
    batches = _batches(3)
    result = score_channels("taylor", gates, batches, batches=2)
    assert result.batches == 2 and result.seconds >= 0
    hand = _hand_taylor(model, batches[:2])
    idx = _by_name(gates)
    torch.testing.assert_close(result.scores[idx["conv1"]], hand["conv1"])
    torch.testing.assert_close(result.scores[idx["conv2"]], hand["conv2"])
    assert result.scores[idx["conv1"]][3] == 0
    assert all(a.grad is None for a in gates.alphas)


def test_taylor_reads_the_conv_and_linear_slices_of_a_group_with_batchnorm():
    """torch-pruning 1.6's TaylorImportance skips BatchNorm γ (its norm branch tests the GroupNorm handler); if a
    later version reads it, this test says so."""
    model = _randomise(Chain(bn=True)).eval()
    gates = _gates(model)
    batches = _batches(2)
    scores = criterion_scores("taylor", gates, batches)
    torch.testing.assert_close(scores[_by_name(gates)["conv2"]], _hand_taylor(model, batches)["conv2"])


def test_taylor_leaves_the_model_as_it_found_it():
    model = _randomise(Chain())
    model.train()
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 7.0)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    gates = _gates(model)
    model.train()
    criterion_scores("taylor", gates, _batches(TAYLOR_BATCHES + 2))
    assert model.training and not model.fc.weight.requires_grad
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 7.0))
    assert model.conv2.weight.grad is None
    for k, v in model.named_buffers():  # BN running statistics untouched (eval-mode passes)
        assert torch.equal(v, buffers[k]), k


def test_an_all_zero_group_scores_zero_not_nan():
    model = _randomise(Chain())
    with torch.no_grad():
        model.conv1.weight.zero_()
    gates = _gates(model)
    for name in ("l1", "group-norm", "fpgm"):
        s = criterion_scores(name, gates)[_by_name(gates)["conv1"]]
        assert not s.isnan().any() and (name == "group-norm" or torch.equal(s, torch.zeros(5))), name


@pytest.mark.parametrize("name", CRITERIA)
@pytest.mark.parametrize("model_name, scope", [("tiny_preresnet", ("internal", "branch-input")),
                                               ("tiny_resnet", "coupled")])
def test_criterion_with_select_ratio_prunes_exactly_the_requested_channels(name, model_name, scope):
    torch.manual_seed(0)
    model = _randomise(create_model(model_name), seed=1).eval()
    x = torch.randn(4, 3, 32, 32)
    gates = attach_gates(model, x[:2], scope)
    scores = criterion_scores(name, gates, _batches(2, size=32, classes=10))
    assert [s.shape for s in scores] == [torch.Size([g.size]) for g in gates.groups]
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in scores)
    for s in scores:  # unit mean per group: one global threshold compares like with like
        torch.testing.assert_close(s.mean(), torch.tensor(1.0))
    keep = select_ratio(scores, 0.4)
    pruned = sum(int((~k).sum()) for k in keep)
    assert pruned == round(0.4 * gates.num_channels)
    # the pruned channels are those with the lowest scores (min_channels=1 never binds at these sizes)
    flat, kept = torch.cat(scores), torch.cat(keep)
    assert flat[~kept].max() <= flat[kept].min()
    spec = remove_channels(gates, keep, check_input=x)
    assert spec["max_abs_diff"] <= 1e-4 * max(1.0, spec["max_abs_ref"])


def test_bad_input_is_named():
    gates = _gates(_randomise(Chain()))
    with pytest.raises(ValueError, match="unknown; choose one of fpgm, group-norm, l1, taylor"):
        criterion_scores("l2", gates)
    with pytest.raises(ValueError, match="needs training batches"):
        criterion_scores("taylor", gates)
    with pytest.raises(ValueError, match="batches must be >= 1"):
        criterion_scores("taylor", gates, _batches(1), batches=0)
    with pytest.raises(ValueError, match="yielded none"):
        criterion_scores("taylor", gates, [])


@pytest.mark.parametrize("name", ["l1", "taylor"])
def test_the_registered_one_shot_baseline_returns_the_criterion_scores_and_freezes_alpha(name):
    from types import SimpleNamespace

    from slimrarts.baselines import get_baseline
    from slimrarts.recipe import load_recipe

    model = _randomise(Chain())
    gates = _gates(model)
    recipe = load_recipe({"baselines": {"taylor_batches": 2}})
    batches = _batches(3)
    result = get_baseline(name)(model, gates, SimpleNamespace(train=batches), recipe, device=torch.device("cpu"))
    assert all(not a.requires_grad for a in gates.alphas)  # one-shot: nothing trains before the cut
    assert result.keep is None and result.fit is None and "s to score" in result.note
    expected = score_channels(name, gates, batches, batches=2).scores
    assert len(result.scores) == len(expected)
    for got, want in zip(result.scores, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_score_channels_records_the_criterion_its_batches_and_its_time():
    model = _randomise(Chain(bn=False))
    gates = _gates(model)
    batches = _batches(3)
    taylor = score_channels("taylor", gates, batches, batches=1)  # one batch is allowed, and only one is read
    assert taylor.batches == 1 and taylor.criterion == "taylor" and taylor.note == criterion_info("taylor").note
    assert 0 <= taylor.seconds < 60
    l1 = score_channels("l1", gates)  # needs no data: reads no batch
    assert l1.batches == 0 and l1.criterion == "l1" and l1.note == criterion_info("l1").note
    assert 0 <= l1.seconds < 60
    with pytest.raises(ValueError, match="batches must be >= 1, got 0"):
        score_channels("taylor", gates, batches, batches=0)
