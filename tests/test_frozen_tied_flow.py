"""What the user froze or tied stays so, and control flow the one traced forward did not see (issue 22, items 4-5).

Tiny hand-written nets on the tiny data: each test drives `prune()` (or its stages) for an epoch or two.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import tiny_loaders

import slimrarts
import slimrarts.api as api
from slimrarts.errors import InputError
from slimrarts.width import CoverageWarning, attach_gates
from slimrarts.width.flow import UntracedCallError
from slimrarts.width.trace import build_graph, calls

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.05}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal"]}}


def _config(**prune):
    config = copy.deepcopy(TINY)
    config["prune"].update(prune)
    return config


def _cbr(cin: int, cout: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)


def _kept(result, group: str) -> list[int]:
    return next(g["kept"] for g in result.width_spec["groups"] if g["name"] == group)


def _skipped(result) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in result.report["skipped"]}


# ---------------------------------------------------------------- item 4: frozen layers stay frozen


class FrozenNet(nn.Module):
    """c0 → bn0 (frozen) → c1 (frozen conv) → bn1 → c2 → bn2 → fc: c0's group is cut through a frozen norm and the
    input channels of a frozen conv; c2's group is cut with everything trainable."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = _cbr(3, 16)
        self.c1, self.bn1 = _cbr(16, 16)
        self.c2, self.bn2 = _cbr(16, 16)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():  # γ away from its init, so a value that moved would show
            self.bn0.weight.uniform_(0.5, 1.5)
            self.bn0.bias.uniform_(-0.2, 0.2)
        self.bn0.requires_grad_(False)
        self.c1.requires_grad_(False)

    def forward(self, x):
        x = self.bn0(self.c0(x)).relu()
        x = self.bn1(self.c1(x)).relu()
        x = self.bn2(self.c2(x)).relu()
        return self.fc(x.mean((2, 3)))


def _frozen_parameters(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def test_frozen_norm_and_conv_in_a_pruned_group_stay_frozen_and_untouched(tiny_sets, tmp_path):
    """A one-shot method leaves α at 1: after the cut and a fine-tuning epoch that trains everything else, the frozen
    BN's γ and β and the frozen conv's weight are the dense values at the kept channels, bitwise, and still frozen;
    and so they load back from slim.pt into a frozen model."""
    torch.manual_seed(0)
    dense = FrozenNet()
    result = slimrarts.prune(dense, tiny_loaders(tiny_sets), 0.4, method="l1", config=TINY, progress=False,
                             run_dir=tmp_path / "run")
    slim = result.model
    kept = _kept(result, "c0")
    assert 0 < len(kept) < 16  # the group through the frozen layers was cut
    assert _frozen_parameters(slim) == _frozen_parameters(dense)  # every flag as the user left it
    assert not slim.bn0.weight.requires_grad and not slim.bn0.bias.requires_grad and not slim.c1.weight.requires_grad
    assert torch.equal(slim.bn0.weight, dense.bn0.weight[kept])
    assert torch.equal(slim.bn0.bias, dense.bn0.bias[kept])
    assert torch.equal(slim.c1.weight, dense.c1.weight[:, kept])
    kept2 = _kept(result, "c2")
    assert not torch.equal(slim.bn2.weight, dense.bn2.weight[kept2])  # fine-tuning did train what is trainable
    loaded = slimrarts.load(tmp_path / "run", model=FrozenNet())
    assert _frozen_parameters(loaded) == _frozen_parameters(dense)


def test_a_frozen_norm_carrying_a_gate_takes_alpha_at_the_cut_and_nothing_after(tiny_sets):
    """With RARTS the search learns α: the cut folds it into the frozen γ and β (the searched network), and the search
    and fine-tuning leave them there: γ_slim = (α·γ_dense)[kept] bitwise, still frozen."""
    torch.manual_seed(0)
    dense = FrozenNet()
    recipe = api._resolve_recipe(TINY, ratio=0.4)
    run = api.prepare(dense, tiny_loaders(tiny_sets), recipe, progress=False)
    api.search(run)
    api.select(run)
    i = [g.name for g in run.gates.groups].index("c0")
    alpha = run.gates.alphas[i].detach().clone()
    assert not torch.equal(alpha, torch.ones_like(alpha))  # the search moved α
    assert torch.equal(run.model.bn0.weight, dense.bn0.weight)  # the search did not train the frozen γ
    for stage in (api.remove, api.recalibrate, api.finetune):
        stage(run)
    result = api.finish(run)
    kept = _kept(result, "c0")
    assert torch.equal(result.model.bn0.weight, (dense.bn0.weight * alpha)[kept])
    assert torch.equal(result.model.bn0.bias, (dense.bn0.bias * alpha)[kept])
    assert torch.equal(result.model.c1.weight, dense.c1.weight[:, kept])
    assert _frozen_parameters(result.model) == _frozen_parameters(dense)


# ---------------------------------------------------------------- item 4: tied weights


class TiedNet(nn.Module):
    """s0 → c0 → c1 → c3 with c3.weight = c1.weight (one Parameter in two modules); s0's group is free."""

    def __init__(self, tie: bool = True):
        super().__init__()
        self.s0, self.sb0 = _cbr(3, 16)
        self.c0, self.b0 = _cbr(16, 8)
        self.c1, self.b1 = _cbr(8, 8)
        self.c3, self.b3 = _cbr(8, 8)
        if tie:
            self.c3.weight = self.c1.weight
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.sb0(self.s0(x)).relu()
        x = self.b0(self.c0(x)).relu()
        x = self.b1(self.c1(x)).relu()
        x = self.b3(self.c3(x)).relu()
        return self.fc(x.mean((2, 3)))


def test_groups_that_would_cut_a_tied_parameter_are_left_whole_and_named(tiny_sets):
    """Every group reading or writing c1/c3 is left unpruned, with a reason and a warning naming c1.weight and both
    holders; the slim model still holds one Parameter in both places, at its full width; the free group is cut."""
    torch.manual_seed(0)
    with pytest.warns(CoverageWarning, match=r"tied parameters: c1\.weight \(held by c1\.weight and c3\.weight\)"):
        result = slimrarts.prune(TiedNet(), tiny_loaders(tiny_sets), 0.3, config=TINY, progress=False)
    skipped = _skipped(result)
    for group in ("c0", "c1", "c3"):
        assert "c1.weight is one parameter held by c1.weight and c3.weight (tied weights)" in skipped[group]
        assert "untie them" in skipped[group]
    assert [g["name"] for g in result.width_spec["groups"]] == ["s0"]
    assert len(_kept(result, "s0")) < 16
    slim = result.model
    assert slim.c3.weight is slim.c1.weight and slim.c1.weight.shape == (8, 8, 3, 3)
    slim(torch.randn(2, 3, 32, 32))
    # untied, the same net is cut everywhere (the groups were left whole because of the tie, not anything else)
    untied = attach_gates(TiedNet(tie=False), torch.randn(2, 3, 32, 32))
    assert [g.name for g in untied.groups] == ["s0", "c0", "c1", "c3"]


def test_a_model_with_only_tied_groups_fails_before_training_naming_the_parameter(tiny_sets):
    class OnlyTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = _cbr(3, 3)
            self.c3, self.b3 = _cbr(3, 3)
            self.c3.weight = self.c1.weight
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            x = self.b1(self.c1(x)).relu()
            x = self.b3(self.c3(x)).relu()
            return self.fc(x.mean((2, 3)))

    with pytest.warns(CoverageWarning), pytest.raises(InputError, match=r"nothing to prune") as err:
        slimrarts.prune(OnlyTied(), tiny_loaders(tiny_sets), 0.3, config=TINY, progress=False)
    assert "c1.weight is one parameter held by c1.weight and c3.weight (tied weights)" in str(err.value)


class FunctionalUse(nn.Module):
    """c1's weight is also applied with F.conv2d in the model's forward (optionally also c1 called as a module)."""

    def __init__(self, functional: bool = True):
        super().__init__()
        self.functional = functional
        self.s0, self.sb0 = _cbr(3, 16)
        self.c0, self.b0 = _cbr(16, 8)
        self.c1, self.b1 = _cbr(8, 8)
        self.c3, self.b3 = _cbr(8, 8)
        if functional:
            del self.c3
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.sb0(self.s0(x)).relu()
        x = self.b0(self.c0(x)).relu()
        x = self.b1(self.c1(x)).relu()
        if self.functional:
            x = self.b3(nn.functional.conv2d(x, self.c1.weight, padding=1)).relu()
        else:
            x = self.b3(self.c3(x)).relu()
        return self.fc(x.mean((2, 3)))


def test_a_parameter_read_outside_its_module_is_named_and_its_groups_left_whole(tiny_sets):
    """F.conv2d(x, self.c1.weight) in the model's forward: every group that changes c1.weight's shape (c0's, which
    cuts its inputs, and c1's) is left unpruned with a reason naming the parameter and the use, found before the
    search (the probe's case ran to the end and died in the removal check); the slim model runs."""
    torch.manual_seed(0)
    with pytest.warns(CoverageWarning, match=r"c1\.weight \(also read in the model's forward \(conv2d\)\)"):
        result = slimrarts.prune(FunctionalUse(), tiny_loaders(tiny_sets), 0.3, config=TINY, progress=False)
    skipped = _skipped(result)
    for group in ("c0", "c1"):
        assert "c1.weight is also read outside c1, in the model's forward (conv2d)" in skipped[group]
    assert "s0" in [g["name"] for g in result.width_spec["groups"]]
    assert result.model.c1.weight.shape == (8, 8, 3, 3)
    result.model(torch.randn(2, 3, 32, 32))
    # the same net with c3 called as a module has c0's and c1's groups gated: the use outside was what stopped them
    plain = attach_gates(FunctionalUse(functional=False), torch.randn(2, 3, 32, 32))
    assert {"c0", "c1"} <= {g.name for g in plain.groups}


def test_a_parameter_its_own_module_reads_is_not_an_outside_use():
    """A layer-scale Parameter read in its block's own forward (ConvNeXt's) is not flagged, also when torch-pruning's
    first `model(*x)` fails midway and its post-processing reads the parameter's shape after the pass."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.ones(1, 8, 1, 1))

        def forward(self, x):
            return x + self.gamma * self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Scaled(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    assert calls(build_graph(model, torch.randn(2, 3, 8, 8))).outside == {}


# ---------------------------------------------------------------- item 5: control flow the trace did not see


class Block(nn.Module):
    """c2 → bn2 → (a or b) → bn3: `b` runs when `take_b` says so (data-dependent in the nets below)."""

    def __init__(self, c: int):
        super().__init__()
        self.c2, self.bn2 = _cbr(c, c)
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x, take_b: bool):
        x = self.bn2(self.c2(x)).relu()
        x = self.b(x) if take_b else self.a(x)
        return self.bn3(x).relu()


class BranchNet(nn.Module):
    """c0 → c1 → blk → fc, where blk takes branch b for inputs whose mean is above `threshold` (or when `force_b`)."""

    def __init__(self, threshold: float = 50.0):
        super().__init__()
        self.threshold, self.force_b = threshold, False
        self.c0, self.bn0 = _cbr(3, 16)
        self.c1, self.bn1 = _cbr(16, 12)
        self.blk = Block(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        take_b = self.force_b or bool(x.mean() > self.threshold)
        x = self.bn0(self.c0(x)).relu()
        x = self.bn1(self.c1(x)).relu()
        return self.fc(self.blk(x, take_b).mean((2, 3)))


def _calls(module: nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_an_untraced_module_called_in_the_search_stops_it_at_that_call_with_a_named_error(tiny_sets):
    """Traced on a bright batch (branch b), searched on the normalised data (branch a): the search stops at a's first
    call, a never having run, with an error naming it and the control flow, not with a channel mismatch after the
    cut."""
    torch.manual_seed(0)
    recipe = api._resolve_recipe(TINY, ratio=0.3)
    bright = torch.full((2, 3, 32, 32), 100.0)
    with pytest.warns(CoverageWarning, match=r"did not see blk\.a \(did not run\)"):
        run = api.prepare(BranchNet(), tiny_loaders(tiny_sets), recipe, progress=False, example_input=bright)
        calls = _calls(run.model.blk.a)
        with pytest.raises(UntracedCallError) as err:
            api.search(run)
    assert calls[0] == 0  # stopped before a's first forward
    text = str(err.value)
    assert "module 'blk.a' was called" in text and "data-dependent control flow" in text
    assert "prune.exclude" in text and "static" in text
    assert isinstance(err.value, InputError) and err.value.exit_code == 2
    assert run.search_phase is None  # the search did not finish an epoch


def test_an_untraced_module_called_in_fine_tuning_stops_it_there(tiny_sets):
    """The guard outlives the cut: a branch first taken during fine-tuning stops it at that call."""
    torch.manual_seed(0)
    recipe = api._resolve_recipe(TINY, ratio=0.3)
    with pytest.warns(CoverageWarning):
        run = api.prepare(BranchNet(), tiny_loaders(tiny_sets), recipe, progress=False)
        for stage in (api.search, api.select, api.remove, api.recalibrate):
            stage(run)
    run.model.force_b = True
    with pytest.raises(UntracedCallError, match=r"module 'blk\.b' was called"):
        api.finetune(run)


def test_groups_around_an_untaken_branch_are_not_cut_and_the_slim_model_takes_it(tiny_sets, tmp_path):
    """Branch b never runs in the trace or in training: every group inside blk or entering or leaving it is left
    whole (with b named), the free group c0 is cut, and the slim model, with no guard left, runs an input that takes
    b; slim.pt loads back into a fresh net."""
    torch.manual_seed(0)
    with pytest.warns(CoverageWarning, match=r"did not see blk\.b \(did not run\)"):
        result = slimrarts.prune(BranchNet(), tiny_loaders(tiny_sets), 0.3, config=TINY, progress=False,
                                 run_dir=tmp_path / "run")
    skipped = _skipped(result)
    for group in ("c1", "blk.c2", "blk.a"):
        assert skipped[group].startswith("blk.b has parameters but did not run in the traced forward (a branch of "
                                         "blk's forward")
    assert [g["name"] for g in result.width_spec["groups"]] == ["c0"]
    assert len(_kept(result, "c0")) < 16
    slim = result.model
    assert all(not m._forward_pre_hooks for m in slim.modules())
    calls = _calls(slim.blk.b)
    bright = torch.full((2, 3, 32, 32), 100.0)
    assert slim(bright).shape == (2, 10) and calls[0] == 1
    torch.testing.assert_close(slimrarts.load(tmp_path / "run", model=BranchNet())(bright), slim(bright))


def test_prune_exclude_lets_an_untraced_module_run(tiny_sets):
    """The remedy the error names: with the module in prune.exclude, the same run goes through (the groups around it
    are left whole either way), without a warning that the pattern changes nothing; the slim model takes both
    branches."""
    torch.manual_seed(0)
    bright = torch.full((2, 3, 32, 32), 100.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = slimrarts.prune(BranchNet(), tiny_loaders(tiny_sets), 0.3, config=_config(exclude=["blk.a"]),
                                 progress=False, example_input=bright)
    assert not [w for w in seen if "changes nothing" in str(w.message)]
    assert [g["name"] for g in result.width_spec["groups"]] == ["c0"]
    assert result.model(torch.randn(2, 3, 32, 32)).shape == result.model(bright).shape == (2, 10)


class AuxNet(nn.Module):
    """c0 → c1 → c2 → fc, with an auxiliary head on c1's channels in training mode only (as GoogLeNet's)."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = _cbr(3, 16)
        self.c1, self.bn1 = _cbr(16, 12)
        self.c2, self.bn2 = _cbr(12, 12)
        self.fc = nn.Linear(12, 10)
        self.aux = nn.Linear(12, 10)

    def forward(self, x):
        x = self.bn0(self.c0(x)).relu()
        x = self.bn1(self.c1(x)).relu()
        out = self.fc(self.bn2(self.c2(x)).relu().mean((2, 3)))
        return (out, self.aux(x.mean((2, 3)))) if self.training else out


def test_a_training_only_head_keeps_the_channels_it_reads_and_runs_unguarded(tiny_sets):
    """The eval-mode trace does not hold the auxiliary head; the group it reads (c1's) is left whole, naming it, the
    others are cut, and search and fine-tuning call the head without a guard stopping them or a channel mismatch."""
    torch.manual_seed(0)
    with pytest.warns(CoverageWarning, match=r"did not see aux \(runs in training mode only\)"):
        result = slimrarts.prune(AuxNet(), tiny_loaders(tiny_sets), 0.3, config=TINY, progress=False)
    assert _skipped(result) == {"c1": "aux runs in training mode only, outside the traced (eval-mode) graph, and reads "
                                      "or writes these channels, so they are not pruned"}
    assert [g["name"] for g in result.width_spec["groups"]] == ["c0", "c2"]
    assert result.model.aux.in_features == 12


def test_the_training_mode_pass_leaves_no_trace():
    """Finding the training-only modules runs the net once in training mode: BN statistics, their counters and the
    random streams are as before, and the modules' training flags too."""
    model = AuxNet().eval()
    model.bn1.train()
    x = torch.randn(2, 3, 16, 16)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    torch.manual_seed(3)
    gates = attach_gates(model, x, warn=False)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert [m.training for m in model.modules()] == flags
    assert [u.name for u in gates.gaps.unseen] == ["aux"]


def test_a_branch_on_the_batch_size_is_named_with_the_trace_input_shape():
    """The probe's case: `b(x) if x.shape[0] < 10 else a(x)`; the trace's 2 images take `b`, so `a` is untraced. The
    warning gives the shape the trace ran on and names the batch size as a cause; `a`'s first call names it."""

    class ByBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.b0 = _cbr(3, 8)
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.b0(self.c0(x)).relu()
            x = self.b(x) if x.shape[0] < 10 else self.a(x)
            return self.fc(x.mean((2, 3)))

    model = ByBatch()
    with pytest.warns(CoverageWarning, match=r"did not see a \(did not run\).*input shape \[2, 3, 8, 8\].*batch size"):
        gates = attach_gates(model, torch.randn(2, 3, 8, 8))
    gates.guard_untraced()
    with pytest.raises(UntracedCallError, match=r"module 'a' was called.*its batch size"):
        model(torch.randn(16, 3, 8, 8))

