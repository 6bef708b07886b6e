"""A model's input and output adapters: `model(x)` takes one batch tensor and returns [batch, classes] logits.

A model that returns a tuple, a namedtuple or a dict (GoogLeNet and Inception-v3 return namedtuples in training
mode) is read through `logits_of` by default; `output_fn` and `input_fn` hooks cover anything else (a model taking
a dict: `input_fn=lambda x: {"pixel_values": x}`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import InputTypeError

__all__ = ["OutputError", "attach_io", "logits_of"]


class OutputError(InputTypeError):
    """The model's output holds no logits slimrarts can find."""


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a `.logits` field, a dict's `logits` (else its only
    tensor), or the first element of a tuple/list/namedtuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and out:
        if "logits" not in out and sum(isinstance(v, torch.Tensor) for v in out.values()) > 1:
            raise OutputError(f"the model returns a dict with several tensors ({', '.join(map(repr, out))}) and no "
                              "'logits': which one is the [batch, classes] output is a guess slimrarts will not make; "
                              f"pass output_fn=lambda out: out[{next(iter(out))!r}] (or the key it is)")
        first = out["logits"] if "logits" in out else next(iter(out.values()))
        if isinstance(first, torch.Tensor):
            return first
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise OutputError(f"cannot read logits from the model's output ({type(out).__name__}): slimrarts reads a tensor, a "
                    "`.logits` field, a dict's 'logits' or first value, or a tuple's first element; pass "
                    "output_fn=<a function from the output to the [batch, classes] logits>")


def attach_io(model: nn.Module, input_fn: Callable | None = None, output_fn: Callable | None = None, *,
              logits: bool = True) -> list:
    """Hooks on `model` so that `model(x)` takes a batch tensor and returns logits: `input_fn(x)` builds the model's
    input (a dict is passed as keyword arguments), `output_fn` (default `logits_of`, unless `logits` is false: a
    task other than classification reads the output as the model gives it) reads its output. Returns the hook
    handles; `.remove()` them to give the model back as it was."""
    handles = []
    if input_fn is not None:
        def pre(_module, args, kwargs):
            value = input_fn(args[0])
            return ((), dict(value)) if isinstance(value, dict) else ((value,), kwargs)

        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    read = output_fn or (logits_of if logits else None)
    if read is not None:
        handles.append(model.register_forward_hook(lambda _m, _a, out: read(out)))
    return handles
