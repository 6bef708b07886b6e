"""Genotypes: a discrete DARTS cell pair, its text/JSON forms, the published cells, and deriving one from α."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingFileError
from .operations import OPS, PRIMITIVES

__all__ = ["Genotype", "DARTS_V1", "DARTS_V2", "GENOTYPES", "derive", "count_skips", "parse_genotype",
           "load_genotype"]

Edge = tuple[str, int]  # (operation, index of the input state: 0, 1 = the two cell inputs, 2.. = earlier nodes)


def _check_cell(edges: Sequence[Edge], concat: Sequence[int], what: str) -> None:
    if not edges or len(edges) % 2:
        raise InputError(f"genotype {what}: expected 2 edges per node (an even, non-zero count), got {len(edges)}")
    for k, edge in enumerate(edges):
        if not (isinstance(edge, tuple) and len(edge) == 2 and isinstance(edge[0], str)
                and isinstance(edge[1], int) and not isinstance(edge[1], bool)):
            raise InputError(f"genotype {what}[{k}]: expected an (operation, input index) pair, got {edge!r}")
        name, j = edge
        if name not in OPS or name == "none":
            allowed = ", ".join(p for p in PRIMITIVES if p != "none")
            raise InputError(f"genotype {what}[{k}]: operation {name!r} is not allowed; choose one of {allowed}")
        node = k // 2
        if not 0 <= j < node + 2:
            raise InputError(f"genotype {what}[{k}]: node {node} can read states 0..{node + 1}, got input {j}")
    n_states = len(edges) // 2 + 2
    if not concat or any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n_states for c in concat):
        raise InputError(f"genotype {what}_concat: expected state indices in 0..{n_states - 1}, got {list(concat)}")


@dataclasses.dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell: per intermediate node two (operation, input) edges, and the states whose
    concatenation is the cell's output. Same fields, order and meaning as DARTS' `Genotype` namedtuple."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("normal", "reduce"):
            try:
                edges = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in getattr(self, name))
                concat = tuple(getattr(self, f"{name}_concat"))
            except TypeError:
                raise InputError(f"genotype {name}: expected a list of (operation, input) pairs and a list of "
                                 "state indices") from None
            object.__setattr__(self, name, edges)
            object.__setattr__(self, f"{name}_concat", concat)
            _check_cell(edges, concat, name)

    def to_dict(self) -> dict[str, Any]:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Genotype:
        missing = [k for k in ("normal", "normal_concat", "reduce", "reduce_concat") if k not in data]
        if missing:
            raise InputError(f"genotype: missing key(s) {missing}")
        return cls(normal=data["normal"], normal_concat=data["normal_concat"], reduce=data["reduce"],
                   reduce_concat=data["reduce_concat"])

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"genotype: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise InputError(f"genotype: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def __str__(self) -> str:
        def cell(edges):
            return "[" + ", ".join(f"({op!r}, {j})" for op, j in edges) + "]"
        return (f"Genotype(normal={cell(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={cell(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    @classmethod
    def parse(cls, text: str) -> Genotype:
        return parse_genotype(text)


def _literal(node: ast.expr, key: str) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" and not node.keywords:
        args = [_literal(a, key) for a in node.args]
        if not 1 <= len(args) <= 3 or not all(isinstance(a, int) for a in args):
            raise InputError(f"genotype text: {key}=range(...) needs 1 to 3 integers")
        return list(range(*args))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise InputError(f"genotype text: the value of {key} is not a literal") from None


def parse_genotype(text: str) -> Genotype:
    """Read `Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5], reduce=..., reduce_concat=...)`
    (our `str()`, and DARTS' printed form with `range(2, 6)`), without evaluating code."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise InputError(f"genotype text: not a Genotype(...) expression ({err.msg})") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
        raise InputError("genotype text: expected Genotype(normal=..., normal_concat=..., reduce=..., "
                         "reduce_concat=...)")
    if tree.args:
        raise InputError("genotype text: give the fields by name (normal=..., normal_concat=..., ...)")
    return Genotype.from_dict({kw.arg: _literal(kw.value, str(kw.arg)) for kw in tree.keywords})


# The cells published with DARTS (Liu, Simonyan, Yang, ICLR 2019), first- and second-order search on CIFAR-10.
DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=(2, 3, 4, 5),
)
DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=(2, 3, 4, 5),
)
GENOTYPES: dict[str, Genotype] = {"darts_v1": DARTS_V1, "darts_v2": DARTS_V2}


def _derive_cell(weights: torch.Tensor, steps: int, primitives: Sequence[str]) -> list[Edge]:
    none = primitives.index("none") if "none" in primitives else None
    if none is not None:
        weights = weights.clone()
        weights[:, none] = float("-inf")  # `none` never wins an edge nor an operation
    best_w, best_op = weights.max(dim=1)
    edges, start = [], 0
    for node in range(steps):
        n = node + 2
        strength = best_w[start:start + n].tolist()
        # the two strongest inputs; ties go to the lower input index (a stable sort)
        keep = sorted(range(n), key=lambda j: -strength[j])[:2]
        edges.extend((primitives[int(best_op[start + j])], j) for j in keep)
        start += n
    return edges


def derive(alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor, steps: int = 4,
           primitives: Sequence[str] = PRIMITIVES, multiplier: int | None = None) -> Genotype:
    """The DARTS genotype of α: per node the 2 incoming edges with the largest best non-`none` softmax weight, each
    with that best non-`none` operation; the cell output concatenates the last `multiplier` (default: all) nodes."""
    out = []
    n_edges = steps * (steps + 3) // 2
    for name, alpha in (("alpha_normal", alpha_normal), ("alpha_reduce", alpha_reduce)):
        alpha = torch.as_tensor(alpha).detach().float().cpu()
        if alpha.shape != (n_edges, len(primitives)):
            raise InputError(f"derive: {name} must have shape ({n_edges}, {len(primitives)}) for steps={steps}, "
                             f"got {tuple(alpha.shape)}")
        out.append(_derive_cell(torch.softmax(alpha, dim=-1), steps, primitives))
    multiplier = steps if multiplier is None else multiplier
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=tuple(out[0]), normal_concat=concat, reduce=tuple(out[1]), reduce_concat=concat)


def count_skips(genotype: Genotype, cell: str = "normal") -> int:
    """Number of skip_connect edges in the `normal` cell (what "architecture collapse" counts), `reduce`, or `both`."""
    cells = {"normal": (genotype.normal,), "reduce": (genotype.reduce,), "both": (genotype.normal, genotype.reduce)}
    if cell not in cells:
        raise InputError(f"cell must be one of {', '.join(cells)}, got {cell!r}")
    return sum(op == "skip_connect" for edges in cells[cell] for op, _ in edges)


def load_genotype(spec: str | os.PathLike | dict | Genotype) -> Genotype:
    """A genotype from a registered name (`darts_v2`, `darts_v1`), its dict (`to_dict`), a `.json` file, or a text
    file holding `Genotype(...)`."""
    if isinstance(spec, Genotype):
        return spec
    if isinstance(spec, dict):
        return Genotype.from_dict(spec)
    key = str(spec)
    if key.lower() in GENOTYPES:
        return GENOTYPES[key.lower()]
    path = Path(key)
    if not path.is_file():
        raise MissingFileError(f"genotype {key!r} is neither a known name ({', '.join(GENOTYPES)}) nor a file")
    text = path.read_text()
    return Genotype.from_json(text) if text.lstrip().startswith("{") else parse_genotype(text)
