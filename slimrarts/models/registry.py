"""Model registry: zoo models registered by decorator, plus ``timm:<name>`` and ``torchvision:<name>``."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ..errors import InputError, InputTypeError

__all__ = ["TAG", "create_model", "is_model", "list_models", "model_info", "register_model"]

# The attribute `create_model` sets on each model it builds: {"name", "num_classes", "kwargs"} of the call (weights
# left out: slim.pt carries its own), read by `provenance.infer_model_info`. An instance attribute: it survives
# copy.deepcopy and pickling.
TAG = "_slimrarts_model_info"

_F = TypeVar("_F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, dict[str, Any]] = {}

# Metadata every zoo entry carries; register_model(...) may override these keys and no others.
_DEFAULT_INFO: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "family": None,
    "pre_activation": False,
    "classifier": "fc",
}


def register_model(fn: _F | None = None, *, name: str | None = None, **info: Any) -> Any:
    """Register a zoo model factory ``fn(num_classes=..., **kwargs) -> nn.Module``.

    Use bare (``@register_model``: the name is the function's name) or with arguments
    (``@register_model(name=..., family=..., pre_activation=..., input_size=..., classifier=...)``).
    """
    unknown = sorted(set(info) - set(_DEFAULT_INFO))
    if unknown:
        raise InputTypeError(f"register_model: unknown metadata key(s) {unknown}; allowed: {sorted(_DEFAULT_INFO)}")

    def _register(f: _F) -> _F:
        key = f.__name__ if name is None else name
        if not isinstance(key, str) or not key or ":" in key:
            raise InputError(f"register_model: name={key!r} must be a non-empty string without ':'")
        if key in _MODELS:
            raise InputError(f"register_model: a model named {key!r} is already registered")
        _MODELS[key] = f
        _INFO[key] = {**_DEFAULT_INFO, **info, "name": key, "source": "zoo"}
        return f

    if fn is None:
        return _register
    if not callable(fn):
        raise InputTypeError(f"register_model: expected a callable or keyword arguments, got {fn!r}")
    return _register(fn)


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    names: Callable[[], list[str]]
    has: Callable[[str], bool]
    create: Callable[..., nn.Module]


def _zoo_create(arch: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise InputError(f"pretrained={pretrained!r}: the zoo model {arch!r} has no pretrained weights; use False")
    return _MODELS[arch](num_classes=num_classes, **kwargs)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_has(arch: str) -> bool:
    import timm

    return timm.is_model(arch)


def _timm_create(arch: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)


def _tv_names() -> list[str]:
    import torchvision

    models = torchvision.models
    return sorted({*models.list_models(module=models), *models.list_models(module=models.segmentation),
                   *models.list_models(module=models.detection)})


def _tv_has(arch: str) -> bool:
    return arch in _tv_names()


def _tv_create(arch: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    import torchvision

    if pretrained:
        raise InputError(
            f"pretrained={pretrained!r} is not used for torchvision models; pass weights='DEFAULT' (or a weights "
            f"enum) instead, e.g. create_model('torchvision:{arch}', weights='DEFAULT', num_classes=1000)"
        )
    kwargs.setdefault("weights", None)
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(arch)).parameters:
        kwargs.setdefault("weights_backbone", None)  # segmentation and detection models: no download either
    return torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)


_ZOO = _Source(names=lambda: sorted(_MODELS), has=lambda arch: arch in _MODELS, create=_zoo_create)
_SOURCES: dict[str, _Source] = {
    "timm": _Source(names=_timm_names, has=_timm_has, create=_timm_create),
    "torchvision": _Source(names=_tv_names, has=_tv_has, create=_tv_create),
}
_LIST_HINT = (
    "list names with slimrarts.models.list_models() (zoo), list_models('timm:*') or list_models('torchvision:*')"
)


def _split(name: Any, arg: str = "name") -> tuple[str | None, str, _Source]:
    """Split ``name`` into (prefix or None, architecture, source)."""
    if not isinstance(name, str):
        raise InputTypeError(f"{arg} must be a str, got {type(name).__name__} ({name!r})")
    prefix, sep, arch = name.partition(":")
    if not sep:
        return None, name, _ZOO
    if prefix not in _SOURCES:
        raise InputError(f"{arg}={name!r}: unknown prefix {prefix!r}; allowed prefixes: {sorted(_SOURCES)} or none")
    return prefix, arch, _SOURCES[prefix]


def _unknown(name: str, prefix: str | None, arch: str, source: _Source) -> ValueError:
    tag = "" if prefix is None else f"{prefix}:"
    close = [f"{tag}{m}" for m in difflib.get_close_matches(arch, source.names(), n=5, cutoff=0.6)]
    if prefix is None:  # a bare timm/torchvision name is a common slip: point to the prefixed form first
        close = [f"{p}:{arch}" for p, src in _SOURCES.items() if src.has(arch)] + close
    hint = f"did you mean {close}? " if close else "no close match; "
    return InputError(f"unknown model name={name!r}; {hint}{_LIST_HINT}")


# ---------------------------------------------------------------------------------------------- public API


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names matching the fnmatch ``pattern``: zoo names, or ``timm:``/``torchvision:`` names if so prefixed."""
    if pattern is None:
        return sorted(_MODELS)
    prefix, arch, source = _split(pattern, "pattern")
    tag = "" if prefix is None else f"{prefix}:"
    return [f"{tag}{m}" for m in sorted(source.names()) if fnmatch.fnmatchcase(m, arch)]


def is_model(name: str) -> bool:
    """Whether ``create_model(name)`` knows the name (zoo, ``timm:<name>`` or ``torchvision:<name>``)."""
    try:
        _, arch, source = _split(name)
    except ValueError:
        return False
    return source.has(arch)


def create_model(name: str, num_classes: int = 10, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model by name: a zoo name, ``timm:<name>`` (``timm.create_model``) or ``torchvision:<name>``.

    torchvision models (classification, segmentation and detection) are built with ``weights=None`` (and
    ``weights_backbone=None``) unless those are passed; ``pretrained`` applies to
    timm only. Other keyword arguments go to the model's factory. The model is tagged with the call (`TAG`), so
    that `slimrarts.prune` can record how to rebuild it.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise InputTypeError(f"num_classes must be an int, got {type(num_classes).__name__} ({num_classes!r})")
    if num_classes < 1:
        raise InputError(f"num_classes={num_classes} must be >= 1")
    prefix, arch, source = _split(name)
    if not source.has(arch):
        raise _unknown(name, prefix, arch, source)
    model = source.create(arch, num_classes, pretrained, **kwargs)
    recorded = {k: v for k, v in kwargs.items() if not (prefix == "torchvision" and k == "weights")}
    model.__dict__[TAG] = {"name": name, "num_classes": num_classes, "kwargs": recorded}
    return model


def model_info(name: str) -> dict[str, Any]:
    """Metadata of a model name: ``name``, ``source``, ``input_size``, ``family``, ``pre_activation``, ``classifier``.

    Only zoo models carry metadata; for ``timm:``/``torchvision:`` names the other fields are None.
    """
    prefix, arch, source = _split(name)
    if not source.has(arch):
        raise _unknown(name, prefix, arch, source)
    if prefix is None:
        return dict(_INFO[arch])
    return {**dict.fromkeys(_DEFAULT_INFO), "name": name, "source": prefix}
