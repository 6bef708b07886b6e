"""Make a gated model physically slimmer: fold α into the weights, remove channels, verify, save and reload.

Every rebuilt parameter keeps the `requires_grad` of the one it replaces (a frozen BatchNorm or conv stays frozen in
fine-tuning). A frozen norm that carries a gate still takes α into its γ and β at the cut: that is the searched
network (with α at 1, as the one-shot baselines leave it, its kept values are the dense ones).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ..engine.checkpoint import CorruptFileError, load_checkpoint, save_atomic
from ..errors import InputError
from ..modes import evaluating
from .gates import Gates
from .groups import ChannelGroup, find_groups
from .norms import is_norm, norm_width
from .trace import module_outputs, pruning_group

__all__ = ["ChannelSelect", "fold_gates", "remove_channels", "layer_widths", "apply_spec", "save_slim", "load_slim",
           "read_slim_spec"]

SPEC_FORMAT = 1


class ChannelSelect(nn.Module):
    """Keep the channels `index` of the input (the pruned entrance of a pre-activation branch)."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} channels"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def fold_gates(gates: Gates, alphas: list[torch.Tensor] | None = None) -> None:
    """Multiply each gate's α into the layer it sits on (norm affine, or producer output rows)."""
    with torch.no_grad():
        modules = dict(gates.model.named_modules())
        for group, alpha in zip(gates.groups, alphas if alphas is not None else gates.alphas, strict=True):
            alpha = alpha.detach().flatten().repeat(group.repeat)  # one value per channel
            for site in group.sites:
                m = modules[site.module]
                a = alpha.to(m.weight.dtype)
                if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight is (in, out, ...); groups == 1 here
                    m.weight.mul_(a.view((1, -1) + (1,) * (m.weight.dim() - 2)))
                else:
                    m.weight.mul_(a.view((-1,) + (1,) * (m.weight.dim() - 1)))
                if getattr(m, "bias", None) is not None:
                    m.bias.mul_(a)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """[in, out] channels of every conv, linear and norm layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
        elif is_norm(m):
            out[name] = [norm_width(m)] * 2
    return out


@contextlib.contextmanager
def _keeping_grad_flags(model: nn.Module) -> Iterator[None]:
    """Inside the block parameters are rebuilt narrower (torch-pruning makes new ones, all requiring grad); after it
    each has the `requires_grad` of the one it replaced, so what the user froze stays frozen."""
    flags = [(m, name, p.requires_grad) for m in model.modules() for name, p in m._parameters.items()
             if p is not None]
    try:
        yield
    finally:
        for m, name, flag in flags:
            p = m._parameters.get(name)
            if p is not None and p.requires_grad != flag:
                p.requires_grad_(flag)


def _prune_group(model: nn.Module, dg: tp.DependencyGraph, group: ChannelGroup, removed: list[int]) -> None:
    modules = dict(model.named_modules())
    if not removed:
        return
    if group.scope == "branch-input":
        norm = modules[group.root]
        dg.get_pruner_of_module(norm).prune_out_channels(norm, removed)
        for name in group.consumers:
            m = modules[name]
            dg.get_pruner_of_module(m).prune_in_channels(m, removed)
        return
    pruning_group(dg, modules[group.root], removed).prune()


def _check_tiled(group: ChannelGroup, kept: list[int]) -> None:
    """Grouped convs keep the same positions in every conv group: kept channels repeat with period size/repeat."""
    if group.repeat == 1:
        return
    n = group.num_alphas
    first = sorted(c for c in kept if c < n)
    if sorted(kept) != [r * n + c for r in range(group.repeat) for c in first]:
        raise InputError(f"group {group.name!r}: kept channels must be the same positions in each of its "
                         f"{group.repeat} blocks of {n} channels (grouped convolutions)")


def _insert_selects(model: nn.Module, groups: list[ChannelGroup], kept: list[list[int]]) -> None:
    for group, keep in zip(groups, kept, strict=True):
        if group.scope == "branch-input" and len(keep) < group.size:
            norm = model.get_submodule(group.root)
            index = torch.tensor(keep, device=norm.weight.device)
            _set_module(model, group.root, nn.Sequential(ChannelSelect(index), norm))


def _leaves(value) -> list[torch.Tensor]:
    """Every tensor in a (nested) output: tuples, lists, dicts, namedtuples opened; as float."""
    return [t.detach().float() for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _observe(model: nn.Module, x, modules: Sequence[str] | None) -> dict[str, list[torch.Tensor]]:
    """The tensors the check compares, by where they come from: the model's output ("" ), or with `modules` the
    outputs of those submodules (every call's, in order; "" names the model itself)."""
    if modules is None:
        return {"": _leaves(model(x))}
    caught = module_outputs(model, modules, "check_modules")(model, x)
    return {name: _leaves(out) for name, out in zip(modules, caught, strict=True)}


def _compare(reference: dict[str, list[torch.Tensor]], out: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """max |out - reference| over each source's tensors; tensors that do not line up (another count or shape: a
    data-dependent selection such as non-maximum suppression changed) raise."""
    diffs = {}
    for name, ref in reference.items():
        got = out[name]
        shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in ref]
        if shapes[0] != shapes[1]:
            where = f"submodule {name!r}" if name else "the model"
            raise RuntimeError(
                f"the removal check cannot compare the outputs of {where}: the slim model gives tensors of shapes "
                f"{shapes[0][:6]}, the gated one {shapes[1][:6]}. A selection that depends on the values (score "
                "thresholds, top-k, non-maximum suppression) picked other elements; check the raw predictions "
                "instead: check_modules=slimrarts.width.raw_output_modules(model) for a detection model")
        diffs[name] = max(((a - b).abs().max().item() for a, b in zip(got, ref, strict=True) if a.numel()),
                          default=0.0)
    return diffs


def remove_channels(gates: Gates, keep: list[torch.Tensor], check_input: torch.Tensor | None = None,
                    check_modules: Sequence[str] | None = None) -> dict:
    """Fold α, remove the channels not kept, and return the width spec (with the check's max abs difference).

    With `check_input`, the gated model in eval mode with the pruned α set to zero is compared with the slim
    model: their outputs must agree (the removal invariant); the difference is stored in the spec as `max_abs_diff`
    (and the largest reference value as `max_abs_ref`). Every tensor of the output is compared (an `OrderedDict`
    of a segmentation model's "out" and "aux", say). With `check_modules` (submodule names; "" is the model
    itself), the outputs of those submodules in the check's forward are compared instead of the model's: for a
    detection model, whose output is boxes after non-maximum suppression (a discontinuous function of the
    predictions), its raw heads (`heads.raw_output_modules`); the spec then also holds `max_abs_diff_by_module`.
    The model is changed in place and its hooks are removed.

    Raises:
        InputError: the keep masks do not fit the groups, or a `check_modules` name is not a submodule or did not
            run.
        RuntimeError: the slim model fails on the check's input, or its checked outputs have other shapes.
    """
    if check_modules is not None:
        if isinstance(check_modules, str):
            raise InputError(f"check_modules must be a list of submodule names, got the string {check_modules!r}")
        check_modules = list(check_modules)
        module_outputs(gates.model, check_modules, "check_modules")  # the names checked before anything is cut
    model = gates.model
    if len(keep) != len(gates.groups):
        raise InputError(f"keep has {len(keep)} masks for {len(gates.groups)} groups")
    for group, k in zip(gates.groups, keep, strict=True):
        if k.numel() != group.num_alphas:
            raise InputError(f"keep mask of group {group.name!r} has {k.numel()} entries; its α has "
                             f"{group.num_alphas} ({group.size} channels, {group.repeat} per entry: reduce "
                             "per-channel scores with Gates.entry_scores before selecting)")
    with torch.no_grad(), evaluating(model):
        reference = None
        if check_input is not None:
            with gates.masked(keep):
                reference = _observe(model, check_input, check_modules)
        before = layer_widths(model)
        kept = [torch.nonzero(g.channel_mask(k.cpu().bool()), as_tuple=False).flatten().tolist()
                for g, k in zip(gates.groups, keep, strict=True)]
        removed = [sorted(set(range(g.size)) - set(k)) for g, k in zip(gates.groups, kept, strict=True)]
        gates.remove()
        fold_gates(gates)
        with _keeping_grad_flags(model):
            for group, rem in zip(gates.groups, removed, strict=True):
                _prune_group(model, gates.dg, group, rem)
        _insert_selects(model, gates.groups, kept)
        after = layer_widths(model)
        spec: dict[str, Any] = {
            "format": SPEC_FORMAT,
            "input_shape": list(gates.example_input.shape) if gates.example_input is not None else None,
            "outputs": list(gates.outputs),  # where the trace ended (apply_spec traces the same way)
            "groups": [{"name": g.name, "scope": g.scope, "root": g.root, "size": g.size, "repeat": g.repeat, "kept": k}
                       for g, k in zip(gates.groups, kept, strict=True)],
            # a pruned branch entrance `name` is now Sequential(ChannelSelect, norm): its norm is `name.1`
            "layers": {name: {"before": w, "after": after.get(name, after.get(f"{name}.1", w))}
                       for name, w in before.items()},
        }
        if reference is not None:
            try:
                out = _observe(model, check_input, check_modules)
            except RuntimeError as err:  # a use of the channels that the graph did not show; not the user's error
                raise RuntimeError(
                    f"the slim model fails on the removal check's input ({type(err).__name__}: {err}): the forward "
                    "uses the cut channels somewhere the traced graph did not show (a tensor of a fixed width, a "
                    "parameter read by hand); please report this model. Adding the layers around that use to "
                    "prune.exclude lets the run go on") from err
            diffs = _compare(reference, out)
            spec["max_abs_diff"] = max(diffs.values(), default=0.0)
            spec["max_abs_ref"] = max((t.abs().max().item() for ts in reference.values() for t in ts if t.numel()),
                                      default=0.0)
            if check_modules is not None:
                spec["max_abs_diff_by_module"] = diffs
        return spec


def apply_spec(model: nn.Module, spec: dict, example_input: torch.Tensor | None = None) -> nn.Module:
    """Prune a freshly built `model` (same architecture as the original) to the widths in `spec`, in place."""
    if spec.get("format") != SPEC_FORMAT:
        raise InputError(f"width spec format {spec.get('format')!r} is not supported (expected {SPEC_FORMAT})")
    if example_input is None:
        shape = spec.get("input_shape") or [1, 3, 32, 32]
        example_input = torch.randn(*shape, device=next(model.parameters()).device)
    scopes = sorted({g["scope"] for g in spec["groups"]})
    groups, _, dg = find_groups(model, example_input, scopes, check_gaps=False,  # the cut was decided already
                                outputs=spec.get("outputs", ()))
    by_name = {g.name: g for g in groups}
    ordered, kept = [], []
    for entry in spec["groups"]:
        group = by_name.get(entry["name"])
        if group is None or group.size != entry["size"] or group.repeat != entry.get("repeat", 1):
            raise InputError(f"width spec group {entry['name']!r} (size {entry['size']}) does not exist in this model; "
                             "was it built with the same architecture and arguments?")
        _check_tiled(group, entry["kept"])
        ordered.append(group)
        kept.append(entry["kept"])
    with _keeping_grad_flags(model):
        for group, keep in zip(ordered, kept, strict=True):
            _prune_group(model, dg, group, sorted(set(range(group.size)) - set(keep)))
    _insert_selects(model, ordered, kept)
    return model


def save_slim(path: str | os.PathLike, model: nn.Module, spec: dict, model_info: dict | None = None) -> None:
    """Save the slim model as data: the width spec (JSON-able) and the state_dict, in one file."""
    payload_spec = dict(spec, model=model_info)
    save_atomic({"spec": json.dumps(payload_spec), "state_dict": model.state_dict()}, path)


def _read_slim(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, dict]:
    payload = load_checkpoint(path, map_location, what="slim model", keys=("spec", "state_dict"),
                              remedy="re-run the pruning that wrote it (its run folder's checkpoints are kept)")
    try:
        spec = json.loads(payload["spec"])
    except (TypeError, ValueError):
        raise CorruptFileError(f"{str(path)!r}: the width spec inside this slim model is not valid JSON; re-run the "
                               "pruning that wrote it") from None
    return payload, spec


def read_slim_spec(path: str | os.PathLike) -> dict:
    """The width spec saved in a `slim.pt` (kept channels, layer widths, `input_shape`, the `model` it was cut
    from)."""
    return _read_slim(path)[1]


def load_slim(path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = "cpu",
              build: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Rebuild a slim model saved by `save_slim`: the original architecture, cut to the spec, then its weights.

    Without `model`, the architecture is built by `build(name, num_classes=..., **kwargs)` from the model name and
    arguments the spec records (`slimrarts.load` passes `slimrarts.models.create_model`).
    """
    payload, spec = _read_slim(path, map_location)
    if model is None:
        info = spec.get("model")
        if not info or not info.get("name"):
            raise InputError(f"{path} does not record which model it was cut from (slimrarts could not name the "
                             "model it pruned); pass the original model, uncut: slimrarts.load(path, "
                             "model=YourModel(...))")
        if build is None:
            raise InputError(f"{path} was cut from {info['name']!r}, and no factory was given to build it: pass the "
                             "original model, uncut (model=...), or build=slimrarts.models.create_model "
                             "(slimrarts.load does)")
        model = build(info["name"], num_classes=info.get("num_classes", 10), **info.get("kwargs", {}))
    else:
        model = copy.deepcopy(model)  # the caller's model is never cut in place, even when loading fails
    apply_spec(model, spec)
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
        mismatch = (f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
                    if result.missing_keys or result.unexpected_keys else "")
    except RuntimeError as err:  # shape mismatches
        mismatch = str(err).split("\n", 1)[-1].strip()[:400]
    if mismatch:
        raise InputError(f"the weights in {str(path)!r} do not fit the model cut to its width spec ({mismatch}); "
                         "was it cut from another architecture or other arguments?")
    return model.eval()
