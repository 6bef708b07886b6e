"""Network Slimming (Liu et al., ICCV 2017): sparsity training with ℓ1 on BN γ, then one global |γ| threshold.

The scores are the γ of the norms that carry the gates, so NS and RARTS prune exactly the same channel set (for
PreResNet-164 with scopes internal + branch-input: every BN, block-input BNs through input selection, as NS's
`channel_selection` does). The ℓ1 subgradient s·sign(γ) is added to γ's gradient after backward and before the
optimizer step, so it is unaffected by autocast (bf16 needs no loss scaling) and adds to weight decay, as in NS.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..engine.callbacks import Event, on
from ..engine.fit import fit
from ..engine.task import CLASSIFICATION
from ..errors import InputError
from .base import BaselineResult, register_baseline, search_like

__all__ = ["SlimmingPenalty", "bn_l1_subgradient", "slimming", "train_sparse"]


def bn_l1_subgradient(weights: list[torch.Tensor], s: float):
    """A callable adding s·sign(γ) to each γ's gradient (foreach; no host sync)."""

    def add():
        with torch.no_grad():
            grads = [w.grad for w in weights]
            torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=s)

    return add


def _site_norms(model: nn.Module, gates) -> list[list[nn.Module]]:
    modules = dict(model.named_modules())
    out = []
    for group in gates.groups:
        norms = []
        for site in group.sites:
            if site.fold != "norm":
                raise InputError(f"slimming scores channels by BN γ, but group {group.name!r} has a gate on "
                                 f"{site.module}, which is not a norm; choose scopes whose gates all sit on norms "
                                 "(a pre-activation ResNet: prune.scope [internal, branch-input] or branch-input) "
                                 "or another method")
            norm = modules[site.module]
            if not isinstance(norm.weight, nn.Parameter):
                raise InputError(f"slimming trains BN γ with an ℓ1 penalty, but {site.module} "
                                 f"({type(norm).__name__}) holds its γ as a buffer, which training leaves alone; "
                                 "use another method, or a trainable BatchNorm there")
            norms.append(norm)
        out.append(norms)
    return out


class SlimmingPenalty:
    """Network Slimming's sparsity term over the norms that carry `gates`: α frozen (the scores are γ), γ set to
    `init_gamma`, `add_subgradient()` after each backward, `scores()` per group (|γ| averaged over a group's norms).

    `settings` is a recipe's `baselines` section (`sparsity` s, `init_gamma`)."""

    def __init__(self, model: nn.Module, gates, settings):
        for a in gates.alphas:
            a.requires_grad_(False)
        self.norms = _site_norms(model, gates)
        unique = list({id(m): m for group in self.norms for m in group}.values())
        if settings.init_gamma is not None:  # on resume, the checkpoint is then loaded over it
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                        m.weight.fill_(settings.init_gamma)
        self.sparsity = settings.sparsity
        self.weights = [m.weight for m in unique]
        self.add_subgradient = bn_l1_subgradient(self.weights, settings.sparsity)

    def scores(self) -> list[torch.Tensor]:
        """One score per channel of each group: |γ|, averaged over the group's norms (on the CPU)."""
        return [torch.stack([m.weight.detach().abs().float() for m in group]).mean(0).cpu() for group in self.norms]

    @property
    def note(self) -> str:
        return f"Network Slimming: BN-γ ℓ1 (s={self.sparsity}), whole training set"


def train_sparse(model, penalty: SlimmingPenalty, loaders, recipe, *, device, run_dir=None, resume=False,
                 progress=True, task=CLASSIFICATION, optimizer=None):
    """NS's sparsity training: the recipe's `search` epochs and optimizer on the whole training set, the ℓ1
    subgradient added after every backward (the one loop `slimming` and `WidthSearch.run` run)."""
    return fit(model, loaders.train, None, cfg=search_like(recipe), device=device, run_dir=run_dir, phase="search",
               resume=resume, progress=progress, task=task, optimizer=optimizer,
               callbacks=[on(Event.AFTER_BACKWARD, lambda _: penalty.add_subgradient())])


def slimming(model, gates, loaders, recipe, *, device, run_dir=None, resume=False, progress=True,
             task=CLASSIFICATION) -> BaselineResult:
    """γ ← init_gamma; train on the whole set with s‖γ‖₁; scores = |γ| at each group's gate sites."""
    penalty = SlimmingPenalty(model, gates, recipe.baselines)
    result = train_sparse(model, penalty, loaders, recipe, device=device, run_dir=run_dir, resume=resume,
                          progress=progress, task=task)
    return BaselineResult(scores=penalty.scores(), keep=None, fit=result, note=penalty.note)


register_baseline("slimming", source="Network Slimming (Liu et al., ICCV 2017)",
                  description="sparsity training with s·‖γ‖₁ on BN γ (γ initialised to 0.5); one global |γ| threshold",
                  score_name="|gamma|")(slimming)
