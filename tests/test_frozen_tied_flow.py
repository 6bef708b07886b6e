"""What the user froze stays so (issue 22, item 4).

Tiny hand-written nets on the tiny data: each test drives `prune()` (or its stages) for an epoch or two.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from conftest import tiny_loaders

import slimrarts
import slimrarts.api as api

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
