"""`slimrarts.WidthSearch`: width search driven by a loop of the user's own (issue 25). prune() is built on it, so
a hand-written loop over the public API gives prune()'s result bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_loaders

import slimrarts
from slimrarts.errors import InputError
from slimrarts.models import create_model

SEARCH = {"method": "rarts", "epochs": 2, "score": "grad",
          "optim": {"lr": 0.05, "schedule": "step", "milestones": [0.5], "gamma": 0.5},
          "optim_arch": {"lr": 0.01}}
CONFIG = {"seed": 0, "device": "cpu", "search": SEARCH,
          "prune": {"scope": ["internal", "branch-input"], "mode": "ratio", "ratio": 0.4, "recalibrate": 2},
          "report": {"latency": False}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_preresnet")


def _first_images(loader, n: int = 8) -> torch.Tensor:
    x, _ = next(iter(loader))
    return x[:n].float()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def test_a_hand_written_rarts_loop_gives_prunes_slim_model_bit_for_bit(tiny_sets):
    """The user's loop: their own epochs over D_t/D_v, the learning rates of w and y by torch.optim.lr_scheduler,
    then the cut with recalibration; prune()'s stages up to its fine-tuning (prepare, search, select, remove,
    recalibrate: what prune() runs before `finetune`) with the same seed and settings give the same widths and the
    same weights, statistics included, exactly."""
    from slimrarts import api

    model = _model()
    run = api.prepare(copy.deepcopy(model), tiny_loaders(tiny_sets), api._resolve_recipe(CONFIG), progress=False)
    for stage in (api.search, api.select, api.remove, api.recalibrate):
        stage(run)
    run.close()

    loaders = tiny_loaders(tiny_sets)
    mine = copy.deepcopy(model)
    x = _first_images(loaders.search_t)
    torch.manual_seed(0)
    search = slimrarts.WidthSearch(mine, x, config=CONFIG)
    steps = min(len(loaders.search_t), len(loaders.search_v))
    schedules = [torch.optim.lr_scheduler.MultiStepLR(search.optimizers[k], milestones=[steps], gamma=0.5)
                 for k in ("w", "y")]
    for epoch in range(2):
        loaders.search_t.set_epoch(epoch)
        loaders.search_v.set_epoch(epoch)
        for batch_t, batch_v in zip(loaders.search_t, loaders.search_v, strict=False):
            search.step(batch_t, batch_v)
            for s in schedules:
                s.step()
    assert search.optimizers["w"].param_groups[0]["lr"] == 0.025  # the schedule did drive it
    slim = search.cut(recalibrate=loaders.train)
    assert slim is mine
    assert [g["kept"] for g in search.spec["groups"]] == [g["kept"] for g in run.spec["groups"]]
    _same(slim, run.model)


SLIMMING = {**CONFIG, "search": {"method": "slimming", "epochs": 2,
                                  "optim": {"lr": 0.05, "schedule": "step", "milestones": [0.5], "gamma": 0.5}},
            "baselines": {"sparsity": 1e-3, "init_gamma": 0.5}}


def test_a_hand_written_slimming_loop_gives_prunes_slim_model_bit_for_bit(tiny_sets):
    """Network Slimming in the user's loop: their forward, loss and backward, `regularize()` adds s·sign(γ) to γ's
    gradient, their step of the search's SGD with the learning rate by torch.optim.lr_scheduler; prune(method=
    slimming)'s stages before fine-tuning give the same |γ| ranking, widths and weights, exactly."""
    from slimrarts import api

    model = _model()
    run = api.prepare(copy.deepcopy(model), tiny_loaders(tiny_sets), api._resolve_recipe(SLIMMING), progress=False)
    for stage in (api.search, api.select, api.remove, api.recalibrate):
        stage(run)
    run.close()
    assert run.note.startswith("Network Slimming: BN-γ ℓ1 (s=0.001)")

    loaders = tiny_loaders(tiny_sets)
    mine = copy.deepcopy(model)
    torch.manual_seed(0)
    search = slimrarts.WidthSearch(mine, _first_images(loaders.train), config=SLIMMING)
    assert all(not a.requires_grad for a in search.alphas)  # the scores are γ; α stays 1
    optimizer = search.optimizers["w"]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[len(loaders.train)], gamma=0.5)
    mine.train()
    for epoch in range(2):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train:
            loss = F.cross_entropy(mine(x), y)
            loss.backward()
            search.regularize()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
    slim = search.cut(recalibrate=loaders.train)
    assert [g["kept"] for g in search.spec["groups"]] == [g["kept"] for g in run.spec["groups"]]
    _same(slim, run.model)


def test_slimmings_penalty_is_what_regularize_adds(tiny_sets):
    """regularize() adds exactly s·sign(γ) to the gradient of every gated norm's γ and nothing else."""
    loaders = tiny_loaders(tiny_sets)
    model = _model()
    search = slimrarts.WidthSearch(model, _first_images(loaders.train), config=SLIMMING)
    x, y = next(iter(loaders.train))
    F.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    search.regularize()
    gammas = {id(w) for w in search.penalty.weights}
    assert gammas
    for n, p in model.named_parameters():
        extra = 1e-3 * torch.sign(p.detach()) if id(p) in gammas else torch.zeros_like(p)
        assert torch.equal(p.grad, before[n] + extra), n


def test_the_schedule_is_the_users_a_different_one_gives_other_weights(tiny_sets):
    """Without the step-down of the learning rate the same loop ends elsewhere: the schedule really is driven."""
    loaders = tiny_loaders(tiny_sets)
    ends = []
    for gamma in (0.5, 1.0):
        loaders.search_t.set_epoch(0)
        loaders.search_v.set_epoch(0)
        model = _model()
        search = slimrarts.WidthSearch(model, _first_images(loaders.search_t), config=CONFIG)
        sched = torch.optim.lr_scheduler.StepLR(search.optimizers["w"], step_size=1, gamma=gamma)
        for batch_t, batch_v in zip(loaders.search_t, loaders.search_v, strict=False):
            search.step(batch_t, batch_v)
            sched.step()
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(*ends)


def test_state_dict_round_trip_resumes_exactly(tiny_sets):
    loaders = tiny_loaders(tiny_sets)
    batches = list(zip(loaders.search_t, loaders.search_v, strict=False))[:4]
    x = _first_images(loaders.search_t)
    a = slimrarts.WidthSearch(_model(), x, config=CONFIG)
    for bt, bv in batches[:2]:
        a.step(bt, bv)
    saved = copy.deepcopy(a.state_dict())
    for bt, bv in batches[2:]:
        a.step(bt, bv)
    b = slimrarts.WidthSearch(_model(), x, config=CONFIG)  # a new process: the same model, fresh
    b.load_state_dict(saved)
    for bt, bv in batches[2:]:
        b.step(bt, bv)
    for p, q in zip([*a.alphas, *a.importance, *a.model.parameters(), *a.state.y.values()],
                    [*b.alphas, *b.importance, *b.model.parameters(), *b.state.y.values()], strict=True):
        assert torch.equal(p, q)
    with pytest.raises(InputError, match="method 'rarts'.*runs 'darts1'"):
        slimrarts.WidthSearch(_model(), x, config=CONFIG, method="darts1").load_state_dict(saved)


def test_a_one_net_search_in_an_ordinary_loop_cuts_to_the_masked_model(tiny_sets):
    """joint inside the user's loop: their loss, their backward, `regularize()` steps α, their optimizer the
    weights; the cut model's output equals the gated model's with the pruned α at zero."""
    loaders = tiny_loaders(tiny_sets)
    model = _model()
    search = slimrarts.WidthSearch(model, _first_images(loaders.train), method="joint", config=CONFIG)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before = [a.detach().clone() for a in search.alphas]
    model.train()
    for x, y in loaders.train:
        loss = F.cross_entropy(model(x.float()), y)
        loss.backward()
        search.regularize()
        optimizer.step()
        optimizer.zero_grad()
    assert all(a.grad is None for a in search.alphas)
    assert any(not torch.equal(a, b) for a, b in zip(search.alphas, before, strict=True))
    keep = search.select(ratio=0.5)
    probe = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad(), search.gates.masked(keep):
        masked = model(probe)
    search.remove()
    with torch.no_grad():
        slim = model(probe)
    assert torch.allclose(slim, masked, atol=1e-5, rtol=1e-4)
    assert sum(int(k.sum()) for k in keep) < sum(k.numel() for k in keep)


def test_the_l1_mode_in_an_ordinary_loop_cuts_the_channels_whose_alpha_reached_zero(tiny_sets):
    """prune.mode l1 through `regularize()`: its proximal step leaves exact zeros in α, and the cut removes
    exactly those channels (min_channels permitting)."""
    loaders = tiny_loaders(tiny_sets)
    model = _model()
    config = {**CONFIG, "search": {"optim_arch": {"optimizer": "sgd", "lr": 0.5}},
              "prune": {"scope": ["internal"], "mode": "l1", "l1": 0.5, "min_channels": 1}}
    search = slimrarts.WidthSearch(model, _first_images(loaders.train), method="joint", config=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x, y in list(loaders.train)[:4]:
        F.cross_entropy(model(x), y).backward()
        search.regularize()
        optimizer.step()
        optimizer.zero_grad()
    zeros = [a.detach() == 0 for a in search.alphas]
    assert 0 < sum(int(z.sum()) for z in zeros) < sum(z.numel() for z in zeros)
    keep = search.select()
    for k, z, a in zip(keep, zeros, search.alphas, strict=True):
        if int((~z).sum()) >= 1:  # a group with a surviving α keeps exactly its non-zero entries
            assert torch.equal(k.cpu(), ~z.cpu()), a


def test_a_budget_given_at_the_cut_is_met(tiny_sets):
    loaders = tiny_loaders(tiny_sets)
    search = slimrarts.WidthSearch(_model(), _first_images(loaders.search_t), config=CONFIG)
    for bt, bv in list(zip(loaders.search_t, loaders.search_v, strict=False))[:2]:
        search.step(bt, bv)
    from slimrarts.metrics import macs_and_params

    dense, _ = macs_and_params(copy.deepcopy(search.model), (1, 3, 32, 32))
    slim = search.cut(budget={"macs": "60%"})
    after, _ = macs_and_params(slim, (1, 3, 32, 32))
    assert after <= 0.6 * dense * 1.01 and after < dense


def test_a_latency_budget_given_at_the_cut_is_selected_by_the_latency_model(tiny_sets, monkeypatch):
    """`cut(budget={"latency": ...})`: the per-layer latency model (a deterministic timer here) chooses the
    widths, as prune()'s latency budget does."""
    import warnings

    from test_prune_budget import _deterministic_latency_model, _timed

    import slimrarts.width.select as selection

    built = []
    _deterministic_latency_model(monkeypatch)
    real = selection.build_latency_model
    monkeypatch.setattr(selection, "build_latency_model", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setattr(selection, "time_in", _timed(1e-6))
    loaders = tiny_loaders(tiny_sets)
    search = slimrarts.WidthSearch(_model(), _first_images(loaders.search_t), config=CONFIG)
    for bt, bv in list(zip(loaders.search_t, loaders.search_v, strict=False))[:2]:
        search.step(bt, bv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the real re-timing after the cut may miss on a tiny net
        search.cut(budget={"latency": "60%"})
    assert built  # the latency model was built for this budget
    kept = sum(len(g["kept"]) for g in search.spec["groups"])
    assert 0 < kept < sum(g["size"] for g in search.spec["groups"])


def test_misuse_is_named(tiny_sets):
    loaders = tiny_loaders(tiny_sets)
    x = _first_images(loaders.search_t)
    batch = next(iter(loaders.search_t))
    rarts = slimrarts.WidthSearch(_model(), x, config=CONFIG)
    with pytest.raises(InputError, match=r"rarts learns w on D_t and α on D_v; pass step\(batch_t, batch_v\)"):
        rarts.step(batch)
    with pytest.raises(InputError, match="regularize is for a one-net search"):
        rarts.regularize()
    with pytest.raises(InputError, match="'group-norm' is a baseline without α"):
        slimrarts.WidthSearch(_model(), x, method="group-norm", config=CONFIG)
    with pytest.raises(InputError, match="no keep masks; call select"):
        rarts.remove()
    rarts.cut()
    with pytest.raises(InputError, match="was cut .* already"):
        rarts.step(batch, batch)


def test_the_plain_pytorch_example_runs_and_its_cut_is_within_the_budget(tiny_sets):
    import importlib.util
    from pathlib import Path

    from slimrarts.metrics import macs_and_params

    path = Path(__file__).resolve().parents[1] / "examples" / "rarts_in_your_loop.py"
    spec = importlib.util.spec_from_file_location("rarts_in_your_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    loaders = tiny_loaders(tiny_sets)
    model = _model()
    dense, _ = macs_and_params(copy.deepcopy(model), (1, 3, 32, 32))
    slim = example.search_and_cut(model, loaders.search_t, loaders.search_v, loaders.train, epochs=1, budget="70%")
    example.finetune(slim, loaders.train, epochs=1)
    after, _ = macs_and_params(slim, (1, 3, 32, 32))
    assert after <= 0.7 * dense * 1.01
    assert 0.0 <= example.accuracy(slim, loaders.test) <= 1.0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in slim.modules())  # no gates left
