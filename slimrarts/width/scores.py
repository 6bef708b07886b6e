"""What ranks the channels of a gated model after a search, and the magnitude start of its gates.

The paper ranks channels by |α|. Other scores the search can rank by (`search.score`):

- `alpha_gamma`: |α| times the magnitude of the layer α multiplies (|γ| of a norm, the L2 norm of a producer's output
  row): the scale the channel has once α is folded in;
- `grad`: Σ over the search's α-steps of |α ⊙ g|, with g the α-gradient the method steps with (for RARTS
  λ∇_αL_t(w) + ∇_αL_v(y)): a first-order estimate of the loss change from removing the channel, read from passes the
  search makes anyway.

Both are divided by their mean within each group, so groups of different scales compare (as torch-pruning's
group-norm does). `search.init: magnitude` starts α at the per-group mean-normalised magnitude and divides the layers
α multiplies by the same factor, so the gated network computes what it did before (Gate Decorator, NeurIPS'19).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import InputError
from .gates import Gates
from .surgery import fold_gates

__all__ = ["SCORES", "init_from_magnitude", "normalise_per_group", "search_scores", "site_magnitude"]

SCORES = ("alpha", "alpha_gamma", "grad")


@torch.no_grad()
def site_magnitude(gates: Gates) -> list[torch.Tensor]:
    """Per α entry: the sum over the group's norm sites of |γ_c| (where it has none, of its producers' ‖W_c‖₂),
    averaged over the channels an entry gates."""
    modules = dict(gates.model.named_modules())
    out = []
    for group in gates.groups:
        total = torch.zeros(group.size, device=gates.alphas[0].device)
        norms = [site for site in group.sites if site.fold == "norm"]
        for site in norms or group.sites:
            w = modules[site.module].weight.detach().float()
            if site.fold == "norm":
                mag = w.abs().flatten()
            elif isinstance(modules[site.module], nn.modules.conv._ConvTransposeNd):
                mag = w.transpose(0, 1).flatten(1).norm(dim=1)
            else:
                mag = w.flatten(1).norm(dim=1)
            total += mag.to(total.device)
        out.append(total.view(group.repeat, group.num_alphas).mean(0))
    return out


def normalise_per_group(scores: list[torch.Tensor], eps: float = 1e-12) -> list[torch.Tensor]:
    """Each group's scores divided by their mean (a group of zeros stays zero)."""
    return [s / s.mean().clamp_min(eps) for s in scores]


@torch.no_grad()
def init_from_magnitude(gates: Gates, floor: float = 1e-3) -> list[torch.Tensor]:
    """Start α at the per-group mean-normalised site magnitude s (at least `floor`), and divide the sites by s: the
    network's output is unchanged, and α now carries the magnitude every criterion ranks by. Returns s."""
    s = [m.clamp_min(floor) for m in normalise_per_group(site_magnitude(gates))]
    fold_gates(gates, [1.0 / v for v in s])  # the sites divided by s, as folding α multiplies them
    for a, v in zip(gates.alphas, s, strict=True):
        a.mul_(v.to(a.dtype))
    return s


@torch.no_grad()
def search_scores(gates: Gates, kind: str, importance: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The scores the selection ranks α's entries by (higher survives), for `search.score` = `kind`."""
    if kind == "alpha":
        return [a.detach().abs() for a in gates.alphas]
    if kind == "alpha_gamma":
        return normalise_per_group([a.detach().abs() * m for a, m in zip(gates.alphas, site_magnitude(gates),
                                                                          strict=True)])
    if kind == "grad":
        if importance is None:
            raise InputError("search.score=grad needs the importance the search accumulated; none was kept")
        return normalise_per_group([i.detach().clone() for i in importance])
    raise InputError(f"search.score={kind!r} is not known; allowed: {', '.join(SCORES)}")
