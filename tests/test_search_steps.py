"""One step of every search method against the update written out by hand, on a two-parameter problem.

The problem is smooth and not quadratic, so the order of the steps, λ, β, darts2's ξ and its finite-difference ε all
change the result; λ ≠ 1 and β ≠ 0 throughout. Every variable uses plain SGD at learning rates that are powers of
two (exact in the optimizers' float32 learning-rate tensors), so the hand updates are exact up to float64 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from slimrarts.data import DeviceLoader, split_halves
from slimrarts.engine import SGD
from slimrarts.models import create_model
from slimrarts.recipe import ArchOptimConfig, OptimConfig
from slimrarts.search import get_search, list_searches
from slimrarts.search.base import SearchState
from slimrarts.search.problem import NetProblem, make_state
from slimrarts.width import attach_gates

F64 = torch.float64
LR_W, LR_Y, LR_A = 2.0**-4, 2.0**-5, 2.0**-3
LAM, BETA, MU = 3.0, 0.7, 0.25
W0, Y0, A0 = [0.4, -1.3], [1.1, 0.2], [0.9, -0.6]


# ---- the problem, its gradients by hand ---------------------------------------------------------------------------

def loss_t(w, a):
    return ((w - a) ** 2 + torch.sin(w * a)).sum()


def loss_v(w, a):
    return (a * w - 2 * a + torch.exp(0.3 * w) * a * a / 2).sum()


def cost(a):
    return (a**3).sum() / 3


def gt_w(w, a):
    return 2 * (w - a) + a * torch.cos(w * a)


def gt_a(w, a):
    return -2 * (w - a) + w * torch.cos(w * a)


def gv_w(w, a):
    return a + 0.15 * torch.exp(0.3 * w) * a * a


def gv_a(w, a):
    return w - 2 + torch.exp(0.3 * w) * a


def g_cost(a):
    return a * a


class TwoParam:
    """L_t, L_v (and their sum, the whole data) of w ∈ R² and α ∈ R²; an optional cost μ·Σα³/3 on α."""

    def __init__(self, alpha0, mu: float = 0.0):
        self.arch = [torch.tensor(alpha0, dtype=F64, requires_grad=True)]
        self.mu = mu
        self.passes: list[tuple[str, bool]] = []  # (batch, the w/y buffers were used)

    def loss(self, params, buffers, batch, track=None):
        w, a = params["w"], self.arch[0]
        return {"t": loss_t, "v": loss_v, "tv": lambda w, a: loss_t(w, a) + loss_v(w, a)}[batch](w, a)

    def arch_penalty(self):
        return self.mu * cost(self.arch[0]) if self.mu else None

    def after_arch_step(self, lr) -> None:
        return None


def _state(method: str, problem: TwoParam, *, momentum: float = 0.0, weight_decay: float = 0.0,
           xi: float | None = None) -> SearchState:
    w = {"w": torch.tensor(W0, dtype=F64, requires_grad=True)}
    state = SearchState(w=w, w_buffers={}, opt_w=SGD(list(w.values()), lr=LR_W, momentum=momentum,
                                                       weight_decay=weight_decay),
                        optim_arch=SGD(problem.arch, lr=LR_A), lam=LAM, beta=BETA, xi=xi)
    if get_search(method).two_nets:
        state.y = {"w": torch.tensor(Y0, dtype=F64, requires_grad=True)}
        state.y_buffers = {}
        state.opt_y = SGD(list(state.y.values()), lr=LR_Y)
    return state


def _run(method: str, steps: int, mu: float = 0.0):
    problem = TwoParam(A0, mu)
    state = _state(method, problem)
    batches = ("t", "v") if get_search(method).data == "split" else ("tv", None)
    for _ in range(steps):
        get_search(method).step(problem, state, *batches)
    y = state.y["w"].detach() if state.y is not None else None
    return state.w["w"].detach(), y, problem.arch[0].detach()


# ---- the updates by hand (DESIGN.md §2) ---------------------------------------------------------------------------

def _penalty(a, mu):
    return mu * g_cost(a)


def hand_rarts(w, y, a, mu):
    w = w - LR_W * (LAM * gt_w(w, a) + BETA * (w - y))
    y = y - LR_Y * (gv_w(y, a) + BETA * (y - w))  # the new w
    a = a - LR_A * (LAM * gt_a(w, a) + gv_a(y, a) + _penalty(a, mu))  # the new w and y
    return w, y, a


def hand_rarts_jacobi(w, y, a, mu):
    grad_a = LAM * gt_a(w, a) + gv_a(y, a)  # at the old w and y
    w = w - LR_W * (LAM * gt_w(w, a) + BETA * (w - y))
    y = y - LR_Y * (gv_w(y, a) + BETA * (y - w))
    return w, y, a - LR_A * (grad_a + _penalty(a, mu))


def hand_darts1(w, y, a, mu):
    w = w - LR_W * gt_w(w, a)
    return w, y, a - LR_A * (gv_a(w, a) + _penalty(a, mu))


def hand_milenas(w, y, a, mu):
    w = w - LR_W * gt_w(w, a)
    return w, y, a - LR_A * (gt_a(w, a) + LAM * gv_a(w, a) + _penalty(a, mu))


def hand_joint(w, y, a, mu):
    gw, ga = gt_w(w, a) + gv_w(w, a), gt_a(w, a) + gv_a(w, a)
    return w - LR_W * gw, y, a - LR_A * (ga + _penalty(a, mu))


def _darts2_arch_grad(w, a, xi, unrolled_step):
    """∇_αL_v(w', α) − ξ·(∇_αL_t(w⁺) − ∇_αL_t(w⁻))/(2ε), w' = w − ξ·step, w± = w ± ε∇_{w'}L_v, ε = 0.01/‖∇_{w'}L_v‖."""
    w_virtual = w - xi * unrolled_step
    dw = gv_w(w_virtual, a)
    eps = 0.01 / torch.linalg.vector_norm(dw)
    hvp = (gt_a(w + eps * dw, a) - gt_a(w - eps * dw, a)) / (2 * eps)
    return gv_a(w_virtual, a) - xi * hvp


def hand_darts2(w, y, a, mu, xi=LR_W):
    a = a - LR_A * (_darts2_arch_grad(w, a, xi, gt_w(w, a)) + _penalty(a, mu))
    return w - LR_W * gt_w(w, a), y, a  # the w-step after the α-step, at the new α


HAND = {"rarts": hand_rarts, "rarts-jacobi": hand_rarts_jacobi, "darts1": hand_darts1, "darts2": hand_darts2,
        "milenas": hand_milenas, "joint": hand_joint}


def test_every_registered_method_has_a_hand_update():
    assert set(HAND) == set(list_searches())


@pytest.mark.parametrize("mu", [0.0, MU], ids=["no-cost", "cost"])
@pytest.mark.parametrize("method", list_searches())
def test_two_steps_match_the_hand_update(method, mu):
    """Two iterations (the second starts from the first's w, y and α), with and without the cost penalty μ·Cost(α)."""
    w, y, a = (torch.tensor(v, dtype=F64) for v in (W0, Y0, A0))
    for _ in range(2):
        w, y, a = HAND[method](w, y, a, mu)
    got_w, got_y, got_a = _run(method, 2, mu)
    torch.testing.assert_close(got_w, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_a, a, rtol=1e-12, atol=1e-12)
    if get_search(method).two_nets:
        torch.testing.assert_close(got_y, y, rtol=1e-12, atol=1e-12)
    else:
        assert got_y is None


def test_the_hand_updates_tell_the_orders_apart():
    """The problem is sensitive enough: each rival order or coefficient changes one step by far more than 1e-12."""
    w, y, a = (torch.tensor(v, dtype=F64) for v in (W0, Y0, A0))
    rarts, jacobi = hand_rarts(w, y, a, 0.0), hand_rarts_jacobi(w, y, a, 0.0)
    assert (rarts[2] - jacobi[2]).abs().min() > 1e-3
    darts2_xi0 = hand_darts2(w, y, a, 0.0, xi=0.0)
    assert (hand_darts1(w, y, a, 0.0)[2] - hand_darts2(w, y, a, 0.0)[2]).abs().min() > 1e-4
    assert (darts2_xi0[2] - hand_darts2(w, y, a, 0.0)[2]).abs().min() > 1e-4


# ---- darts2: the α-gradient of the unrolled step, against autograd ------------------------------------------------

def _exact_unrolled_grad(w, a, xi, weight_decay=0.0, momentum_buf=None, momentum=0.0):
    """d/dα L_v(w − ξ(∇_wL_t(w, α) + wd·w + m·buf), α) by autograd through the unrolled step (no finite differences)."""
    a = a.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_t(w, a), w, create_graph=True)
    step = g + weight_decay * w
    if momentum_buf is not None:
        step = step + momentum * momentum_buf
    (grad_a,) = torch.autograd.grad(loss_v(w - xi * step, a), a)
    return grad_a


@pytest.mark.parametrize("alpha0", [A0, [0.3, -0.2]], ids=["norm>1", "norm<1"])
@pytest.mark.parametrize("xi", [None, 0.375], ids=["xi=lr", "xi=0.375"])
def test_darts2_alpha_gradient_is_the_unrolled_gradient(xi, alpha0):
    """The α-step of darts2 follows the exact second-order gradient (autograd through w' = w − ξ∇_wL_t) to O(ε²),
    and the hand finite difference with ε = 0.01/‖∇_{w'}L_v‖ exactly (for ‖∇_{w'}L_v‖ above and below 1); with
    momentum and weight decay in the virtual step as in the weights' own SGD (the momentum buffer exists from the
    second iteration on)."""
    momentum, wd = 0.5, 0.125
    problem = TwoParam(alpha0)
    state = _state("darts2", problem, momentum=momentum, weight_decay=wd, xi=xi)
    xi_value = LR_W if xi is None else xi
    w, a, buf = torch.tensor(W0, dtype=F64), torch.tensor(alpha0, dtype=F64), None
    for _it in range(2):
        unrolled = gt_w(w, a) + wd * w + (momentum * buf if buf is not None else 0.0)
        fd = _darts2_arch_grad(w, a, xi_value, unrolled)
        norm = torch.linalg.vector_norm(gv_w(w - xi_value * unrolled, a)).item()
        assert (norm > 1) == (alpha0 == A0), norm
        exact = _exact_unrolled_grad(w, a, xi_value, wd, buf, momentum)
        get_search("darts2").step(problem, state, "t", "v")
        got = (a - problem.arch[0].detach()) / LR_A
        torch.testing.assert_close(got, fd, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-4)
        assert (got - exact).abs().max() > 0, "finite differences are not exact here; is the test too easy?"
        a = a - LR_A * fd
        g = gt_w(w, a) + wd * w  # the w-step: SGD with momentum and weight decay, at the new α
        buf = g if buf is None else momentum * buf + g
        w = w - LR_W * buf
        torch.testing.assert_close(state.w["w"].detach(), w, rtol=1e-12, atol=1e-12)


# ---- networks: the passes that update α leave the BN running statistics alone -------------------------------------

def _net_setup(tiny_sets, method, optim_arch=None, l1=0.0):
    train, _ = tiny_sets
    torch.manual_seed(0)
    model = create_model("tiny_preresnet")
    gates = attach_gates(model, torch.randn(2, 3, 32, 32), ["internal", "branch-input"])
    idx_t, idx_v = split_halves(train.labels, seed=0)
    bt = next(iter(DeviceLoader(train, 25, train=True, indices=idx_t, seed=1)))
    bv = next(iter(DeviceLoader(train, 25, train=True, indices=idx_v, seed=2)))
    bw = next(iter(DeviceLoader(train, 25, train=True, seed=3)))
    problem = NetProblem(model, gates.alphas, l1=l1)
    state = make_state(model, gates.alphas, method, optim_w=OptimConfig(lr=0.05, weight_decay=1e-4),
                       optim_arch=optim_arch or ArchOptimConfig(lr=0.05), lam=LAM, beta=BETA)
    return model, gates, problem, state, (bt, bv, bw)


def _train_mode_stats(model, params, buffers, x):
    """The buffers after one train-mode forward with `params` (the update a weight-step pass makes)."""
    from torch.func import functional_call

    buffers = {k: v.clone() for k, v in buffers.items()}
    with torch.no_grad():
        functional_call(model, (params, buffers), (x,), strict=False)
    return buffers


@pytest.mark.parametrize("method", list_searches())
def test_alpha_passes_leave_bn_statistics_alone(tiny_sets, method):
    """After one step each net's BN statistics are those of exactly one train-mode pass: its weight-step pass at the
    weights before the step (for darts2, whose α-step comes first, at the new α)."""
    model, gates, problem, state, (bt, bv, bw) = _net_setup(tiny_sets, method)
    spec = get_search(method)
    w0 = {k: v.detach().clone() for k, v in state.w.items()}
    b0 = {k: v.clone() for k, v in state.w_buffers.items()}
    y0 = {k: v.detach().clone() for k, v in state.y.items()} if state.y is not None else None
    if spec.data == "whole":
        spec.step(problem, state, bw, None)
    else:
        spec.step(problem, state, bt, bv)
    alphas_after = [a.detach().clone() for a in gates.alphas]
    if method != "darts2":  # the weight-step passes ran at the α before the step
        with torch.no_grad():
            torch._foreach_copy_(gates.alphas, [torch.ones_like(a) for a in gates.alphas])
    expected_w = _train_mode_stats(model, w0, b0, (bw if spec.data == "whole" else bt)[0])
    for k, v in state.w_buffers.items():
        torch.testing.assert_close(v, expected_w[k], rtol=1e-5, atol=1e-6, msg=f"w buffer {k}")
    if y0 is not None:
        expected_y = _train_mode_stats(model, y0, b0, bv[0])
        for k, v in state.y_buffers.items():
            torch.testing.assert_close(v, expected_y[k], rtol=1e-5, atol=1e-6, msg=f"y buffer {k}")
    with torch.no_grad():
        torch._foreach_copy_(gates.alphas, alphas_after)


# ---- the ℓ1 proximal step -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rarts", "darts1", "joint"])
def test_l1_proximal_step_is_the_exact_soft_threshold_with_sgd(tiny_sets, method):
    """With SGD for α, one step with ℓ1 strength γ gives sign(α̃)·max(|α̃| − η_α·γ, 0), α̃ the step without ℓ1; γ is
    chosen so that the threshold falls between the smallest and the largest |α̃| (some zeros, some survivors)."""
    arch = ArchOptimConfig(optimizer="sgd", lr=2.0**-3, momentum=0.0)
    spec = get_search(method)

    def one_step(l1):
        model, gates, problem, state, (bt, bv, bw) = _net_setup(tiny_sets, method, optim_arch=arch, l1=l1)
        spec.step(problem, state, *((bw, None) if spec.data == "whole" else (bt, bv)))
        return torch.cat([a.detach().flatten() for a in gates.alphas])

    plain = one_step(0.0)
    threshold = plain.abs().quantile(0.5).item()
    gamma = threshold / arch.lr
    got = one_step(gamma)
    expected = plain.sign() * (plain.abs() - torch.tensor(arch.lr, dtype=torch.float32) * gamma).clamp_min(0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    zero = (got == 0).float().mean().item()
    assert 0.3 < zero < 0.7, zero
    assert math.isclose(threshold, torch.tensor(arch.lr) * gamma, rel_tol=1e-6)


# ---- what a step records: the losses of its weight-step passes ----------------------------------------------------

@pytest.mark.parametrize("method", list_searches())
def test_a_step_records_the_losses_of_its_weight_passes(tiny_sets, method):
    """NetProblem.read() after one step: t_* from the pass that trains w on D_t (the whole set for joint), v_* from
    the pass on D_v (y's for the two-net methods, the α-pass for darts1/darts2/milenas); nothing else is recorded.
    Where the recorded pass runs at the starting weights and α, its loss is that of a plain train-mode forward."""
    from torch.func import functional_call

    model, gates, problem, state, (bt, bv, bw) = _net_setup(tiny_sets, method)
    spec = get_search(method)
    w0 = {k: v.detach().clone() for k, v in state.w.items()}
    buffers = {k: v.clone() for k, v in state.w_buffers.items()}

    def loss_at_start(batch):
        with torch.no_grad():
            out = functional_call(model, (w0, {k: v.clone() for k, v in buffers.items()}), (batch[0],), strict=False)
        return torch.nn.functional.cross_entropy(out, batch[1]).item()

    expected = {"t": loss_at_start(bw if spec.data == "whole" else bt)}
    if spec.two_nets:
        expected["v"] = loss_at_start(bv)  # y starts as a copy of w
    spec.step(problem, state, *((bw, None) if spec.data == "whole" else (bt, bv)))
    record = problem.read()
    keys = {"t_loss", "t_acc"} | ({"v_loss", "v_acc"} if spec.data == "split" else set())
    assert set(record) == keys
    if method != "darts2":  # darts2's tracked passes run at the unrolled w' and at the new α
        for name, value in expected.items():
            assert record[f"{name}_loss"] == pytest.approx(value, rel=1e-5), name
    assert problem.read() == {}  # read() resets the meters


def test_grad_clip_scales_the_coupled_weight_gradients():
    """With grad_clip, w's and y's gradients (the β-terms included) are clipped to that norm before their steps."""
    clip = 0.25
    problem = TwoParam(A0)
    state = _state("rarts", problem)
    state.grad_clip = clip
    get_search("rarts").step(problem, state, "t", "v")
    w, y, a = (torch.tensor(v, dtype=F64) for v in (W0, Y0, A0))

    def clipped(g):
        return g * min(1.0, clip / (torch.linalg.vector_norm(g).item() + 1e-6))

    gw = LAM * gt_w(w, a) + BETA * (w - y)
    w = w - LR_W * clipped(gw)
    y = y - LR_Y * clipped(gv_w(y, a) + BETA * (y - w))
    a = a - LR_A * (LAM * gt_a(w, a) + gv_a(y, a))  # α is not clipped
    assert torch.linalg.vector_norm(gw) > clip  # the clip acts
    torch.testing.assert_close(state.w["w"].detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.y["w"].detach(), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(problem.arch[0].detach(), a, rtol=1e-12, atol=1e-12)


def test_step_weights_steps_the_named_copy_only():
    state = _state("rarts", TwoParam(A0))
    for copy in (state.w["w"], state.y["w"]):
        copy.grad = torch.ones_like(copy)
    w0, y0 = state.w["w"].detach().clone(), state.y["w"].detach().clone()
    state.step_weights("y")
    assert torch.equal(state.w["w"], w0) and torch.allclose(state.y["w"], y0 - LR_Y)
    state.step_weights("w")
    assert torch.allclose(state.w["w"], w0 - LR_W)
    with pytest.raises(ValueError, match="which must be 'w' or 'y', got 'v'"):
        state.step_weights("v")
