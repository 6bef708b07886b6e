"""One registry for everything a user can name as `search.method` (`method=` in `prune()`): search algorithms,
baselines and one-shot criteria, each with a frozen info record that the pipeline reads.

Search algorithms register a step function `step(problem, state, batch_t, batch_v)` (see `slimrarts.search`);
baselines and criteria register a run function `run(model, gates, loaders, recipe, *, device, run_dir, resume,
progress) -> BaselineResult` (see `slimrarts.baselines`). This module imports nothing from the package: the
modules that define methods import it and register at import time, and the built-in ones are imported by name the
first time a method is looked up (so the recipe schema, which checks `search.method`, loads no algorithm).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from typing import Any, Literal

from .errors import InputError

__all__ = ["MethodInfo", "describe_methods", "get_method", "list_methods", "register_method"]

Kind = Literal["search", "baseline"]


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What a method is and needs; `prune()` and the recipe read these fields instead of branching on names."""

    name: str
    kind: Kind  # "search": learns α with `step`; "baseline": scores channels with `run`
    source: str  # where it comes from in the literature (or "not the paper's method: ...")
    description: str
    has_alpha: bool  # learns gate scores α (selection reads |α|; ℓ1 mode needs them)
    supports_l1: bool  # can run with prune.mode=l1
    two_nets: bool = False  # needs the second weight copy y
    data: Literal["split", "whole", "none"] = "whole"  # D_t/D_v halves, the whole training set, or no training
    passes: int = 1  # forward+backward passes per iteration (0: no training phase)
    score_name: str = ""  # what its channel scores are, as alphas.json names them ("": the recipe's search.score)
    reads_reference: bool = False  # keeps a reference run's per-group counts (`prune.reference`)
    step: Callable[..., None] | None = None
    run: Callable[..., Any] | None = None

    @property
    def trains(self) -> bool:
        """Whether the method trains before the cut (a search or sparsity phase), as opposed to one-shot scores."""
        return self.data != "none"


_REGISTRY: dict[str, MethodInfo] = {}
BUILTINS = ("slimrarts.search", "slimrarts.baselines")  # the packages whose import registers the built-in methods
_loaded = False


def _load_builtins() -> None:
    """Import the packages that register the built-in methods, once (lazily: looking a method up is the first use)."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before importing: their registrations call back into this module
    for name in BUILTINS:
        importlib.import_module(name)


def register_method(name: str, *, kind: Kind, source: str, description: str, has_alpha: bool, supports_l1: bool,
                    two_nets: bool = False, data: str = "whole", passes: int = 1, score_name: str = "",
                    reads_reference: bool = False):
    """Decorator registering `fn` as method `name`: its search step (kind `search`) or its run function."""
    if kind not in ("search", "baseline"):
        raise InputError(f"kind must be 'search' or 'baseline', got {kind!r}")
    if data not in ("split", "whole", "none"):
        raise InputError(f"data must be 'split', 'whole' or 'none', got {data!r}")
    if kind == "search" and data == "none":
        raise InputError("a search method trains: data must be 'split' or 'whole'")

    def wrap(fn):
        _load_builtins()  # a user's method registered first must not hide a built-in name
        if name in _REGISTRY:
            raise InputError(f"method {name!r} is already registered")
        fns = {"step": fn} if kind == "search" else {"run": fn}
        _REGISTRY[name] = MethodInfo(name=name, kind=kind, source=source, description=description,
                                     has_alpha=has_alpha, supports_l1=supports_l1, two_nets=two_nets, data=data,
                                     passes=passes, score_name=score_name, reads_reference=reads_reference, **fns)
        return fn

    return wrap


def get_method(name: str, kind: Kind | None = None) -> MethodInfo:
    """The registered method `name` (of `kind`, if given); unknown names list the choices."""
    _load_builtins()
    info = _REGISTRY.get(name)
    if info is None or (kind is not None and info.kind != kind):
        choices = list_methods(kind)
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = f"{kind} method" if kind else "method"
        raise InputError(f"{what} {name!r} is unknown{hint}; choose one of {', '.join(choices)}")
    return info


def list_methods(kind: Kind | None = None) -> list[str]:
    """Registered method names (of one kind), in registration order."""
    _load_builtins()
    return [n for n, m in _REGISTRY.items() if kind is None or m.kind == kind]


def describe_methods(kind: Kind | None = None) -> str:
    """The allowed names as recipe errors show them: `rarts, darts1, ... (search); slimming, ... (baselines)`."""
    if kind is not None:
        return ", ".join(list_methods(kind))
    parts = [f"{', '.join(list_methods(k))} ({label})" for k, label in (("search", "search algorithms"),
                                                                        ("baseline", "baselines"))
             if list_methods(k)]
    return "; ".join(parts)
