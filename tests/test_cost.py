"""Cost model: predicted MACs/params of the cut network equal the real count; the differentiable cost term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimrarts.metrics import macs_and_params
from slimrarts.models import create_model
from slimrarts.width import attach_gates, build_cost_model, cost_penalty, group_layers, remove_channels

X = (3, 32, 32)

CASES = [
    ("preresnet20", ("internal",)),
    ("preresnet20", ("internal", "branch-input")),
    ("preresnet20", ("internal", "coupled")),
    ("resnet20", ("internal",)),
    ("resnet20", ("internal", "coupled")),
    ("mobilenetv2_cifar", ("internal",)),
    ("mobilenetv2_cifar", ("internal", "coupled")),
    ("torchvision:resnet18", ("internal",)),
    ("torchvision:resnet18", ("internal", "coupled")),
]


def _gated(name, scopes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    return model, attach_gates(model, torch.randn(1, *X), scopes)


def _random_keep(sizes, low, seed):
    """Random keep masks (random channels, random counts in [low, size])."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for n in sizes:
        k = int(torch.randint(min(low, n), n + 1, (1,), generator=g))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:k]] = True
        keep.append(mask)
    return keep


@pytest.mark.parametrize("name, scopes", CASES, ids=[f"{n}-{'+'.join(s)}" for n, s in CASES])
def test_cost_model_equals_the_count_of_the_cut_model(name, scopes):
    """cost(kept) == macs_and_params of the really cut model, exactly (both are integer counts), and the dense cost
    equals the dense model's count."""
    model, gates = _gated(name, scopes)
    assert gates.groups and not gates.skipped
    cm = build_cost_model(gates)
    assert cm.dense == macs_and_params(model, (1, *X))
    keep = _random_keep(cm.sizes, 1, seed=len(name) + len(scopes))
    predicted = cm(keep)
    assert predicted == cm([int(k.sum()) for k in keep])
    remove_channels(gates, keep)
    assert predicted == macs_and_params(model, (1, *X))


def test_cost_model_at_the_floor_equals_the_cut_model():
    """Every group cut to one channel (the smallest reachable widths) is counted exactly too."""
    model, gates = _gated("mobilenetv2_cifar", ("internal", "coupled"))
    cm = build_cost_model(gates)
    keep = [torch.arange(n) == 0 for n in cm.sizes]
    predicted = cm(keep)
    remove_channels(gates, keep)
    assert predicted == macs_and_params(model, (1, *X))


def test_group_layers_name_the_widths_each_group_changes():
    """resnet20 internal group of a block: conv1 and bn1 lose outputs (bn1 tied), conv2 loses inputs."""
    _, gates = _gated("resnet20", ("internal",))
    roles = group_layers(gates)
    first = roles[[g.name for g in gates.groups].index("layer1.0.conv1")]
    assert first == {"layer1.0.conv1": "out", "layer1.0.bn1": "both", "layer1.0.conv2": "in"}
    _, gates = _gated("preresnet20", ("internal", "branch-input"))
    entrance = group_layers(gates)[0]
    assert gates.groups[0].scope == "branch-input"
    assert entrance == {"layer1.0.bn1": "both", "layer1.0.conv1": "in"}


def test_cost_model_rejects_wrong_kept_counts():
    _, gates = _gated("resnet20", ("internal",))
    cm = build_cost_model(gates)
    with pytest.raises(ValueError, match="groups"):
        cm([1, 2])
    with pytest.raises(ValueError, match="keeps 17 of 16"):
        cm([17] + cm.sizes[1:])
    with pytest.raises(ValueError, match="latency model"):
        cm.function("latency")


def _tiny_double():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    gates = attach_gates(net.double(), torch.randn(1, 3, 8, 8, dtype=torch.double), "internal")
    assert [g.size for g in gates.groups] == [6, 5, 4]
    return gates


@pytest.mark.parametrize("tau", [None, 0.5])
def test_cost_term_gradient_matches_finite_differences(tau):
    """μ·Cost(α)/Cost_dense: autograd gradient == central finite differences (gradcheck, float64)."""
    gates = _tiny_double()
    fn = build_cost_model(gates).function("macs")
    g = torch.Generator().manual_seed(3)
    alphas = [((torch.rand(a.shape, generator=g, dtype=torch.double) * 1.3 + 0.2)
               * torch.where(torch.rand(a.shape, generator=g) < 0.3, -1.0, 1.0).double()).requires_grad_(True)
              for a in gates.alphas]
    penalty = cost_penalty(fn, gates.alphas, mu=0.7, tau=tau)
    assert torch.autograd.gradcheck(lambda *a: penalty(list(a)), alphas, eps=1e-6, atol=1e-8)
    value = penalty(alphas)
    assert value.dim() == 0 and value.requires_grad


def test_cost_term_starts_at_mu_and_equals_the_exact_cost_at_binary_gates():
    """At α = 1 the term is μ; with α ∈ {0, 1} the smooth widths are the kept fractions, so Cost(α) is the exact
    cost of that selection; the term reaches the α of `arch_step` through `grads_of`."""
    gates = _tiny_double()
    cm = build_cost_model(gates)
    fn = cm.function("macs")
    penalty = cost_penalty(fn, gates.alphas, mu=0.3)
    assert penalty().item() == pytest.approx(0.3, rel=1e-6)  # float32 α
    keep = [torch.tensor([1, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 1, 1, 1]), torch.tensor([1, 0, 0, 1])]
    binary = [k.double() for k in keep]
    assert penalty.cost(binary).item() == pytest.approx(cm([k.bool() for k in keep])[0], rel=1e-12)
    grads = torch.autograd.grad(penalty(), gates.alphas)
    assert all((gr > 0).all() for gr in grads)  # every channel costs something: the term pulls every α down


def test_cost_term_validates_its_arguments():
    gates = _tiny_double()
    fn = build_cost_model(gates).function("params")
    with pytest.raises(ValueError, match="mu"):
        cost_penalty(fn, gates.alphas, mu=-1)
    with pytest.raises(ValueError, match="tau"):
        cost_penalty(fn, gates.alphas, tau=0)
    with pytest.raises(ValueError, match="sizes"):
        cost_penalty(fn, gates.alphas[:2] + [torch.ones(7)])
