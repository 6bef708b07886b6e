"""The evaluation network built from a genotype (DARTS' NetworkCIFAR): cells, auxiliary head, drop-path."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import InputError
from .genotypes import Genotype, load_genotype
from .operations import FactorizedReduce, ReLUConvBN, is_identity, make_op

__all__ = ["drop_path", "EvalCell", "AuxiliaryHead", "EvalNetwork", "build_eval_net", "count_params_no_aux"]


def drop_path(x: torch.Tensor, prob: float | torch.Tensor) -> torch.Tensor:
    """Zero whole samples of `x` with probability `prob` (a number or a 0-d tensor), scaling the kept ones by
    1 / (1 − prob)."""
    keep = 1.0 - prob
    mask = torch.empty((x.shape[0], 1, 1, 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """One discrete cell: each node adds two operations of earlier states; the output concatenates `concat`."""

    def __init__(self, genotype: Genotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.reduction, self.multiplier = reduction, len(self.concat)
        self.preprocess0 = FactorizedReduce(c_pp, c) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0)
        self.ops = nn.ModuleList(make_op(name, c, 2 if reduction and j < 2 else 1, affine=True) for name, j in edges)
        self.inputs = [j for _, j in edges]
        self._droppable = [not is_identity(op) for op in self.ops]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor,
                drop_prob: float | torch.Tensor | None = None) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        drop = self.training and drop_prob is not None
        for node in range(len(self.ops) // 2):
            s = None
            for k in (2 * node, 2 * node + 1):
                h = self.ops[k](states[self.inputs[k]])
                if drop and self._droppable[k]:
                    h = drop_path(h, drop_prob)
                s = h if s is None else s + h
            states.append(s)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' CIFAR auxiliary classifier on the 8×8 map after the second reduction."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8×8 → 2×2
            nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """Stem, `layers` cells of a genotype (reductions at 1/3 and 2/3 depth), global pool, linear classifier.

    In train mode with the auxiliary head it returns `(logits, aux_logits)`, else the logits. Drop-path applies in
    train mode to every operation except identities when the net is built with `drop_path > 0`; its probability
    lives in a device tensor that `set_drop_path` changes in place (DARTS raises it linearly with the epoch), so a
    step captured in a CUDA graph sees the new value and no step syncs.
    """

    def __init__(self, genotype: Genotype, C: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = True, drop_path: float = 0.2, stem_multiplier: int = 3, in_chans: int = 3):
        super().__init__()
        for name, value, low in (("C", C, 2), ("num_classes", num_classes, 1), ("layers", layers, 1),
                                 ("stem_multiplier", stem_multiplier, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"EvalNetwork: {name} must be an int >= {low}, got {value!r}")
        if C % 2:
            raise InputError(f"EvalNetwork: C must be even (factorized reductions split it in halves), got {C}")
        self.genotype = genotype
        self.layers = layers
        self.use_drop_path = False
        self.register_buffer("drop_path_prob", torch.zeros(()), persistent=False)
        self.set_drop_path(drop_path)
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, C
        reductions = {layers // 3, 2 * layers // 3}
        self.aux_after = 2 * layers // 3
        cells, reduction_prev, c_aux = [], False, None
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            cell = EvalCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_after:
                c_aux = c_p
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def set_drop_path(self, prob: float) -> None:
        """Set the drop-path probability of later training-mode forwards (in place; turns drop-path on if > 0)."""
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob < 1.0:
            raise InputError(f"drop-path probability must be a number in [0, 1), got {prob!r}")
        self.use_drop_path = self.use_drop_path or prob > 0
        self.drop_path_prob.fill_(float(prob))

    def forward(self, x: torch.Tensor):
        aux = None
        prob = self.drop_path_prob if self.use_drop_path else None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, prob)
            if i == self.aux_after and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, aux) if aux is not None else logits


def build_eval_net(genotype: Genotype | str | os.PathLike | dict, num_classes: int = 10, C: int = 36,
                   layers: int = 20, auxiliary: bool = True, drop_path: float = 0.2) -> EvalNetwork:
    """The evaluation net of `genotype` (a Genotype, its dict, a registered name such as `darts_v2`, or a genotype
    file)."""
    return EvalNetwork(load_genotype(genotype), C=C, num_classes=num_classes, layers=layers, auxiliary=auxiliary,
                       drop_path=drop_path)


def count_params_no_aux(model: nn.Module) -> int:
    """Parameter elements without the auxiliary head (what DARTS and the papers report)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary_head."))
