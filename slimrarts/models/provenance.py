"""Which factory call builds a model: what `slim.pt` records so that `slimrarts.load(path)` can rebuild the original
architecture without being handed it.

`create_model` tags every model it builds (`TAG`, an instance attribute, so it survives `copy.deepcopy`). A model
built directly by timm carries `pretrained_cfg["architecture"]` and `num_classes`; a torchvision classification
model is matched to the builder of `torchvision.models.list_models()` whose model has its class. Every candidate is
rebuilt on the meta device (no memory, no weights) and accepted only if it has the same class and the same state
names and shapes; when none is, nothing is recorded and `slimrarts.load` asks for the model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .registry import TAG, create_model

__all__ = ["infer_model_info"]


def infer_model_info(model: nn.Module) -> dict[str, Any] | None:
    """`{"name", "num_classes", "kwargs"}` such that `create_model(name, num_classes=..., **kwargs)` builds the
    architecture of `model` (same class, same parameter and buffer names and shapes), or None when unsure."""
    for info in _candidates(model):
        built = _rebuild(info)
        if built is not None and _same(built, model):
            return {"name": info["name"], "num_classes": info["num_classes"], "kwargs": dict(info["kwargs"])}
    if type(model).__module__.startswith("torchvision.models."):
        return _torchvision_info(model)
    return None


def _candidates(model: nn.Module) -> Iterator[dict[str, Any]]:
    tagged = model.__dict__.get(TAG)
    if isinstance(tagged, dict):
        yield tagged
    cfg = getattr(model, "pretrained_cfg", None)
    classes = getattr(model, "num_classes", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str) and isinstance(classes, int):
        yield {"name": f"timm:{cfg['architecture']}", "num_classes": classes, "kwargs": {}}


def _torchvision_info(model: nn.Module) -> dict[str, Any] | None:
    """The torchvision builder (same module, then same class and state) and class count that rebuild `model`."""
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    builders = [n for n in names if torchvision.models.get_model_builder(n).__module__ == type(model).__module__]
    widths = _output_widths(model)
    mine = [name for name, _ in _shapes(model)]
    for name in builders:
        for i, num_classes in enumerate(widths):
            info = {"name": f"torchvision:{name}", "num_classes": num_classes, "kwargs": {}}
            built = _rebuild(info)
            if built is None or type(built) is not type(model) or (i == 0 and [n for n, _ in _shapes(built)] != mine):
                break  # another architecture: no class count makes it this one
            if _same(built, model):
                return info
    return None


def _output_widths(model: nn.Module) -> list[int]:
    """Plausible class counts: the width of the last linear layer, then of the last conv (SqueezeNet's head)."""
    out: list[int] = []
    for kind, attr in ((nn.Linear, "out_features"), (nn.Conv2d, "out_channels")):
        last = [getattr(m, attr) for m in model.modules() if isinstance(m, kind)]
        if last and last[-1] not in out:
            out.append(last[-1])
    return out


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rebuild(info: dict[str, Any]) -> nn.Module | None:
    """The model `info` builds, on the meta device (None if it cannot be built or recorded)."""
    try:
        json.dumps(info)  # it goes into slim.pt's JSON width spec
        with torch.device("meta"), _quiet():
            return create_model(info["name"], num_classes=info["num_classes"], **info["kwargs"])
    except Exception:  # noqa: BLE001 - any failure to rebuild means "not this one"
        return None


def _same(built: nn.Module, model: nn.Module) -> bool:
    return type(built) is type(model) and _shapes(built) == _shapes(model)
