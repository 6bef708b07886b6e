"""Search algorithms: the solvable model, RARTS ↔ MiLeNAS, what one iteration touches, every method (one step of each
against the hand update: test_search_steps.py; resume: test_resume.py)."""

from __future__ import annotations

import json

import pytest
import torch

from slimrarts.data import DeviceLoader, split_halves
from slimrarts.engine import SGD, Event, on
from slimrarts.engine.task import Classification
from slimrarts.models import create_model
from slimrarts.recipe import ArchOptimConfig, OptimConfig
from slimrarts.search import get_search, list_searches
from slimrarts.search.loop import run_search
from slimrarts.search.problem import NetProblem, make_state
from slimrarts.toy import rarts_equilibrium, solve
from slimrarts.width import attach_gates

# ---- the solvable bilevel model (paper §III-D) -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["darts1", "milenas"])
def test_first_order_methods_reach_the_spurious_point(method):
    r = solve(method, lam=1.0, lr=0.01, steps=3000, init=(2.0, -2.0, 0.0))
    assert r.alpha == pytest.approx(2.0, abs=1e-3) and r.w == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("lam, beta", [(10.0, 10.0), (15.0, 15.0), (10.0, 3.0)])
def test_rarts_reaches_the_equilibrium_of_eq_13_15(lam, beta):
    r = solve("rarts", lam=lam, beta=beta, lr=0.01, steps=2500, init=(2.0, -2.0, 0.0))
    a, w, y = rarts_equilibrium(lam, beta)
    assert (r.alpha, r.w, r.y) == pytest.approx((a, w, y), abs=1e-4)
    # eq. (13)-(15) themselves hold at the limit
    assert lam * (2 * r.w - 2 * r.alpha) + beta * (r.w - r.y) == pytest.approx(0, abs=1e-3)
    assert r.alpha + beta * (r.y - r.w) == pytest.approx(0, abs=1e-3)
    assert lam * (-2 * r.w + 2 * r.alpha) + r.y - 2 == pytest.approx(0, abs=1e-3)
    # and it is closer to the bilevel minimiser (1, 1) than to the spurious point (2, 2)
    assert abs(r.alpha - 1) + abs(r.w - 1) < abs(r.alpha - 2) + abs(r.w - 2)


def test_paper_values_at_lambda_beta_15():
    a, w, y = rarts_equilibrium(15, 15)
    assert (round(a, 3), round(w, 3), round(y, 3)) == (1.053, 1.018, 0.947)


def test_toy_trajectory_starts_at_init():
    r = solve("rarts", steps=10, init=(2.0, -2.0, 0.5))
    assert r.trajectory.shape == (11, 3)
    assert r.trajectory[0].tolist() == [2.0, -2.0, 0.5]


# ---- networks ----------------------------------------------------------------------------------------------------

def _setup(tiny_sets, method, *, lam=1.0, beta=1e-3, optim_y=None, arch_lr=1e-2, seed=0):
    train, _ = tiny_sets
    torch.manual_seed(seed)
    model = create_model("tiny_preresnet")
    gates = attach_gates(model, torch.randn(2, 3, 32, 32), ["internal", "branch-input"])
    idx_t, idx_v = split_halves(train.labels, seed=0)
    lt = DeviceLoader(train, 25, train=True, indices=idx_t, seed=1)
    lv = DeviceLoader(train, 25, train=True, indices=idx_v, seed=2)
    lw = DeviceLoader(train, 25, train=True, seed=3)
    problem = NetProblem(model, gates.alphas)
    state = make_state(model, gates.alphas, method, optim_w=OptimConfig(lr=0.05, weight_decay=1e-4),
                       optim_y=optim_y, optim_arch=ArchOptimConfig(lr=arch_lr), lam=lam, beta=beta)
    return model, gates, problem, state, (lt, lv, lw)


def _batch(loader):
    return next(iter(loader))


def test_one_rarts_iteration_changes_w_y_and_alpha(tiny_sets):
    model, gates, problem, state, (lt, lv, _) = _setup(tiny_sets, "rarts")
    w0 = {k: v.detach().clone() for k, v in state.w.items()}
    y0 = {k: v.detach().clone() for k, v in state.y.items()}
    a0 = [a.detach().clone() for a in gates.alphas]
    run_search(problem, state, "rarts", epochs=1, optim_w=OptimConfig(lr=0.05), loader_t=_Single(lt),
               loader_v=_Single(lv), progress=False)
    assert all(not torch.equal(w0[k], state.w[k]) for k in w0 if k.endswith("conv1.weight"))
    assert all(not torch.equal(y0[k], state.y[k]) for k in y0 if k.endswith("conv1.weight"))
    assert not any(torch.equal(w0[k], state.y[k]) for k in w0 if k.endswith("conv1.weight"))  # y ≠ w after
    assert all(not torch.equal(a, b) for a, b in zip(a0, gates.alphas, strict=True))
    # each net's BN statistics were updated once (its weight-step pass), not by the α-step passes
    for buffers in (state.w_buffers, state.y_buffers):
        counts = {int(v) for k, v in buffers.items() if k.endswith("num_batches_tracked")}
        assert counts == {1}


class _Single:
    """One batch of a loader, as a loader."""

    def __init__(self, loader):
        self.batch = _batch(loader)

    def __iter__(self):
        yield self.batch

    def __len__(self):
        return 1


def test_rarts_with_large_beta_matches_milenas(tiny_sets):
    """With y = w at the start and y's step 1/β (β large), y lands on the new w: one RARTS(λ=1) iteration is then
    MiLeNAS(λ=1)'s: the same w-step, and the α-gradient ∇_αL_t(w) + ∇_αL_v(y ≈ w) at the new weights.

    (Beyond one iteration they part: the β-term then feeds ∇L_v into the w-step, so RARTS with β → ∞ trains the
    weights on both halves while MiLeNAS trains them on D_t only.)
    """
    beta = 1e7
    optim_y = OptimConfig(lr=1.0 / beta, momentum=0.0, weight_decay=0.0)
    arch = dict(arch_lr=0.5)
    _, ga, pa, sa, (lt, lv, _) = _setup(tiny_sets, "rarts", beta=beta, optim_y=optim_y, **arch)
    _, gb, pb, sb, _ = _setup(tiny_sets, "milenas", **arch)
    for state in (sa, sb):
        state.optim_arch = SGD(state.optim_arch.param_groups[0]["params"],
                                                                             lr=0.5)
    bt, bv = _batch(lt), _batch(lv)
    get_search("rarts").step(pa, sa, bt, bv)
    get_search("milenas").step(pb, sb, bt, bv)
    for k in sa.w:
        torch.testing.assert_close(sa.w[k], sb.w[k], rtol=0, atol=0)
        torch.testing.assert_close(sa.y[k], sa.w[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(ga.alphas, gb.alphas, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    moved = max((a - 1).abs().max().item() for a in ga.alphas)
    assert moved > 1e-3  # α did move, so the agreement is not trivial
    # and the same iteration with an ordinary β (y free) gives a different α
    _, gc, pc, sc, _ = _setup(tiny_sets, "rarts", beta=1e-3, **arch)
    sc.optim_arch = SGD(sc.optim_arch.param_groups[0]["params"], lr=0.5)
    get_search("rarts").step(pc, sc, bt, bv)
    assert any(not torch.allclose(a, c, rtol=1e-4, atol=1e-6) for a, c in zip(ga.alphas, gc.alphas, strict=True))


@pytest.mark.parametrize("method", list_searches())
def test_every_method_runs_a_step_and_moves_alpha(tiny_sets, method):
    model, gates, problem, state, (lt, lv, lw) = _setup(tiny_sets, method)
    spec = get_search(method)
    a0 = [a.detach().clone() for a in gates.alphas]
    w0 = state.w_list[0].detach().clone()
    if spec.data == "whole":
        spec.step(problem, state, _batch(lw), None)
    else:
        spec.step(problem, state, _batch(lt), _batch(lv))
    assert any(not torch.equal(a, b) for a, b in zip(a0, gates.alphas, strict=True))
    assert not torch.equal(w0, state.w_list[0])
    assert (state.y is not None) == spec.two_nets


def test_l1_mode_drives_alphas_to_exact_zero(tiny_sets):
    model, gates, problem, state, (lt, lv, _) = _setup(tiny_sets, "rarts", arch_lr=0.05)
    problem.l1 = 5.0
    run_search(problem, state, "rarts", epochs=2, optim_w=OptimConfig(lr=0.05), loader_t=lt, loader_v=lv,
               progress=False)
    flat = torch.cat([a.detach().flatten() for a in gates.alphas])
    assert (flat == 0).float().mean() > 0.3


def test_alpha_learning_rate_follows_its_schedule(tiny_sets):
    """search.optim_arch.schedule=step drops α's learning rate at the milestones; the default keeps it constant."""
    seen = {}
    for schedule in ("constant", "step"):
        arch = ArchOptimConfig(lr=0.01, schedule=schedule, milestones=[0.5], gamma=0.1)
        model, gates, problem, state, (lt, lv, _) = _setup(tiny_sets, "rarts", arch_lr=0.01)
        lrs = []
        run_search(problem, state, "rarts", epochs=2, optim_w=OptimConfig(lr=0.05), optim_arch=arch, loader_t=lt,
                   loader_v=lv, progress=False,
                   callbacks=[on(Event.EPOCH_END,
                                 lambda _, lrs=lrs, state=state: lrs.append(state.optim_arch.lr_tensor().item()))])
        seen[schedule] = lrs
    assert seen["constant"] == pytest.approx([0.01, 0.01])
    assert seen["step"] == pytest.approx([0.01, 0.001])


@pytest.mark.parametrize("method", ["rarts", "joint"])
def test_search_records_each_epoch(tiny_sets, tmp_path, method):
    """Each epoch's record: phase, method, epoch, the weights' learning rate at its end, the pass meters, images seen
    (both batches of a pair for split methods), the mean |α| and the fraction of α at exactly 0; the result's times."""
    model, gates, problem, state, (lt, lv, lw) = _setup(tiny_sets, method, arch_lr=0.05)
    problem.l1 = 2.0  # some α reach exactly 0
    optim = OptimConfig(lr=0.05, milestones=[0.5])
    optim_y = OptimConfig(lr=0.02, milestones=[0.5])
    result = run_search(problem, state, method, epochs=2, optim_w=optim, optim_y=optim_y, loader_t=lt, loader_v=lv,
                        loader_whole=lw, run_dir=str(tmp_path), progress=False)
    per_epoch = 8 * 25 if method == "joint" else 4 * (25 + 25)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    meters = {"t_loss", "t_acc"} | ({"v_loss", "v_acc"} if method == "rarts" else set())
    for epoch, r in enumerate(result.history):
        assert (r["phase"], r["method"], r["epoch"], r["images"], r["cuda_graph"]) == (
            "search", method, epoch, per_epoch, False)
        assert meters <= set(r) and all(0 <= r[k] <= 1 for k in meters if k.endswith("acc"))
        assert r["images_per_s"] == pytest.approx(r["images"] / r["epoch_s"])
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.005])
    assert state.opt_w.lr_tensor().item() == pytest.approx(0.005)
    if state.opt_y is not None:
        assert state.opt_y.lr_tensor().item() == pytest.approx(0.002)  # y follows its own schedule
    alphas = torch.cat([a.detach().abs().flatten() for a in gates.alphas])
    last = result.history[-1]
    assert last["alpha_mean"] == pytest.approx(alphas.mean().item())
    assert last["alpha_zero"] == pytest.approx((alphas == 0).float().mean().item()) and 0 < last["alpha_zero"] < 1, last
    assert result.wall_s >= result.train_s >= sum(r["epoch_s"] for r in result.history) * 0.999 > 0
    assert result.images_per_s == pytest.approx(2 * per_epoch / result.train_s)
    ckpt = torch.load(tmp_path / "checkpoints" / "search.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and json.loads(ckpt["history"]) == result.history
    assert ckpt["train_s"] == pytest.approx(result.train_s) and 0 < ckpt["wall_s"] <= result.wall_s


def test_search_loop_rejects_missing_or_empty_loaders(tiny_sets):
    _, _, problem, state, (lt, lv, lw) = _setup(tiny_sets, "rarts")
    optim = OptimConfig(lr=0.05)
    with pytest.raises(ValueError, match="needs both halves"):
        run_search(problem, state, "rarts", epochs=1, optim_w=optim, loader_t=lt, progress=False)
    with pytest.raises(ValueError, match="needs both halves"):
        run_search(problem, state, "rarts", epochs=1, optim_w=optim, loader_v=lv, progress=False)
    with pytest.raises(ValueError, match="yield no batches"):
        run_search(problem, state, "rarts", epochs=1, optim_w=optim, loader_t=lt, loader_v=[], progress=False)
    _, _, problem, state, _ = _setup(tiny_sets, "joint")
    with pytest.raises(ValueError, match="whole training set"):
        run_search(problem, state, "joint", epochs=1, optim_w=optim, loader_t=lt, loader_v=lv, progress=False)
    with pytest.raises(ValueError, match="yield no batches"):
        run_search(problem, state, "joint", epochs=1, optim_w=optim, loader_whole=[], progress=False)


def test_register_search_records_what_a_method_needs():
    from slimrarts import methods
    from slimrarts.search import base

    def step(problem, state, batch_t, batch_v):
        return None

    try:
        assert base.register_search("tmp-test", two_nets=True, data="whole", passes=3, source="p",
                                    description="d")(step) is step
        info = get_search("tmp-test")
        assert (info.name, info.step, info.two_nets, info.data, info.passes, info.source, info.description) == (
            "tmp-test", step, True, "whole", 3, "p", "d")
        assert info.kind == "search" and info.has_alpha
        assert "tmp-test" in list_searches() and list_searches() == sorted(list_searches())
        with pytest.raises(ValueError, match="already registered"):
            base.register_search("tmp-test", two_nets=False, data="split", passes=1, source="", description="")(step)
    finally:
        methods._REGISTRY.pop("tmp-test", None)
    with pytest.raises(ValueError, match="data must be"):
        base.register_search("tmp-test", two_nets=False, data="half", passes=1, source="", description="")
    with pytest.raises(ValueError, match="choose one of"):
        get_search("tmp-test")


def test_make_state_builds_w_y_and_their_optimizers():
    """w is the model's own parameters; y an independent copy with its own BN statistics; each optimizer as its
    config says (optim_y defaulting to optim_w); the α optimizer Adam or SGD; the coefficients stored."""
    from slimrarts.search.problem import make_arch_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    arch = [torch.ones(4, requires_grad=True)]
    ow = OptimConfig(lr=0.3, momentum=0.8, weight_decay=1e-3, nesterov=True)
    oy = OptimConfig(lr=0.2, momentum=0.7, weight_decay=2e-3)
    state = make_state(model, arch, "rarts", optim_w=ow, optim_y=oy, optim_arch=ArchOptimConfig(lr=0.04),
                       lam=2.0, beta=0.3, xi=0.05, grad_clip=5.0)
    assert (state.lam, state.beta, state.xi, state.grad_clip) == (2.0, 0.3, 0.05, 5.0)
    assert all(state.w[k] is p for k, p in model.named_parameters())
    assert all(state.w_buffers[k] is b for k, b in model.named_buffers())
    for k, p in model.named_parameters():
        assert torch.equal(state.y[k], p) and state.y[k].data_ptr() != p.data_ptr() and state.y[k].requires_grad
    for group in (state.y_buffers, state.scratch_buffers):
        for k, b in model.named_buffers():
            assert torch.equal(group[k], b) and group[k].data_ptr() != b.data_ptr()
    for opt, cfg, params in ((state.opt_w, ow, state.w_list), (state.opt_y, oy, state.y_list)):
        g = opt.param_groups[0]
        assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (cfg.lr, cfg.momentum,
                                                                             cfg.weight_decay, cfg.nesterov)
        assert [p.data_ptr() for p in g["params"]] == [p.data_ptr() for p in params]
    a = state.optim_arch.param_groups[0]
    assert isinstance(state.optim_arch, torch.optim.Optimizer) and type(state.optim_arch).__name__ == "Adam"
    assert (a["lr"], a["betas"], a["weight_decay"], a["params"][0] is arch[0]) == (0.04, (0.5, 0.999), 0.0, True)
    same = make_state(model, arch, "rarts", optim_w=ow, optim_arch=ArchOptimConfig())
    assert same.opt_y.param_groups[0]["lr"] == 0.3 and same.opt_y.param_groups[0]["nesterov"]
    one = make_state(model, arch, "darts1", optim_w=ow, optim_arch=ArchOptimConfig())
    assert one.y is None and one.y_buffers is None and one.opt_y is None
    sgd = make_arch_optimizer(arch, ArchOptimConfig(optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=0.01))
    assert type(sgd).__name__ == "SGD"
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["weight_decay"]) == (0.5, 0.01)
    adam = make_arch_optimizer(arch, ArchOptimConfig(betas=[0.9, 0.99], weight_decay=0.02))
    assert (adam.param_groups[0]["betas"], adam.param_groups[0]["weight_decay"]) == ((0.9, 0.99), 0.02)


def test_net_problem_meters_and_amp(tiny_sets):
    """Tracked passes accumulate sample-weighted loss and accuracy per meter until read(); bf16 autocast runs the
    forward in bf16 (a different loss, computed in fp32); untracked passes record nothing."""
    train, _ = tiny_sets
    torch.manual_seed(0)
    model = create_model("tiny_resnet")
    x = train.images[:30].float() / 255
    y = train.labels[:30]
    problem = NetProblem(model, [])
    params, buffers = dict(model.named_parameters()), {k: v.clone() for k, v in model.named_buffers()}
    assert problem.device == torch.device("cpu")
    l1 = problem.loss(params, buffers, (x[:10], y[:10]), track="a")
    l2 = problem.loss(params, buffers, (x[10:], y[10:]), track="a")
    problem.loss(params, buffers, (x, y))  # untracked
    out = [torch.func.functional_call(model, (params, {k: v.clone() for k, v in buffers.items()}), (x[s],))
           for s in (slice(0, 10), slice(10, 30))]
    correct = sum(int((o.argmax(1) == y[s]).sum()) for o, s in zip(out, (slice(0, 10), slice(10, 30)), strict=True))
    read = problem.read()
    assert set(read) == {"a_loss", "a_acc"}
    assert read["a_loss"] == pytest.approx((10 * l1.item() + 20 * l2.item()) / 30, rel=1e-6)
    assert read["a_acc"] == pytest.approx(correct / 30)
    assert problem.read() == {}
    bf16 = NetProblem(model, [], amp="bf16").loss(params, buffers, (x, y))
    fp32 = problem.loss(params, buffers, (x, y))
    assert bf16.dtype == torch.float32 and bf16.item() != fp32.item()
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)
    class Seven(Classification):
        def loss(self, out, target, reduction="mean"):
            return out.sum() * 0 + 7.0

    custom = NetProblem(model, [], task=Seven())
    assert custom.loss(params, buffers, (x, y)).item() == 7.0


def test_grads_of_gives_zeros_for_unused_tensors():
    from slimrarts.search.base import grads_of, set_grads

    a, b = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    g = grads_of((a * a).sum(), [a, b])
    assert torch.equal(g[0], torch.tensor([2.0, 4.0])) and torch.equal(g[1], torch.zeros(1))
    set_grads([a, b], g)
    assert a.grad is g[0] and b.grad is g[1]
