"""Typed dataclass configs built from plain dicts, with errors that name the bad key.

A config class is a dataclass whose fields carry simple annotations (int, float, str, bool, Literal, Optional,
list[...], dict[str, Any], another config dataclass). `build(cls, data)` validates a nested dict against it;
`field(..., check=..., allowed=...)` adds a value check whose failure message says what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError, InputTypeError

__all__ = ["ConfigError", "build", "deep_merge", "field", "resume_safe_keys", "set_by_path", "to_dict"]


def field(default: Any = dataclasses.MISSING, *, check=None, allowed=None, default_factory=None,
          resume_safe: bool = False):
    """A dataclass field with an optional value check and a description of the allowed values (a string, or a
    function returning one, for lists that are known only at run time such as registered names).

    `resume_safe`: a resumed run may change this value with `--set` (see `resume_safe_keys`)."""
    meta = {"check": check, "allowed": allowed, "resume_safe": resume_safe}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: null is not allowed; expected {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                if isinstance(value, dict) and dataclasses.is_dataclass(option):
                    raise  # a mapping is meant as that section: its own error names the key
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp) or (str, Any)
        return {_convert(key_tp, k, path): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise InputTypeError(f"unsupported annotation {tp!r} at {path}")  # a schema bug, not a user error


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def deep_merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys on top, mappings merged key by key (a new dict at every merged level; the inputs are
    not changed, their other values are shared)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resume_safe_keys(cls: type, path: str = "") -> tuple[str, ...]:
    """The dotted keys of the fields marked `field(..., resume_safe=True)` in the config class `cls` and in the
    config classes of its fields (an optional section counts as its class), in field order."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if f.metadata.get("resume_safe"):
            out.append(key)
        for sub in _config_classes(hints[f.name]):
            out.extend(resume_safe_keys(sub, key))
    return tuple(out)


def _config_classes(annotation: Any) -> list[type]:
    """The config dataclasses an annotation admits (`X`, `X | None`)."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if dataclasses.is_dataclass(a) and isinstance(a, type)]
    return []


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build the dataclass `cls` from a nested dict, checking keys, types and values."""
    where = path or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown key '{key}'; allowed keys under {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{key}'")
            continue
        raw = data[name]
        default = _field_default(f)
        if isinstance(raw, dict) and dataclasses.is_dataclass(default):
            raw = deep_merge(to_dict(default), raw)  # a partial section keeps the field's own defaults
        value = _convert(hints[name], raw, key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            allowed = f.metadata.get("allowed") or "a different value"
            allowed = allowed() if callable(allowed) else allowed
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A plain nested dict of a config dataclass, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_by_path(data: dict, dotted: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted = 'a.b'`, creating mappings on the way."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override key {dotted!r} is malformed; expected dotted names like train.epochs")
    node = data
    for i, key in enumerate(keys[:-1]):
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: '{'.'.join(keys[: i + 1])}' is {nxt!r}, not a mapping")
        node = nxt
    node[keys[-1]] = value
