"""What a run started from, in a few kilobytes: the model, the data and the versions (`fingerprint.json`).

A run folder records it when the run starts; a resume computes it again and `differences` says, in words, what is
not the same, so continuing a run with another model, other data or another slimrarts/torch is refused instead of
mixing two experiments (or dying on a missing key deep inside `load_state_dict`).

- **model**: the name and shape of every parameter and buffer, and a SHA-256 of the starting weights (values,
  dtypes and names, in the model's order; independent of the device and the memory format).
- **data**: the number of samples of each loader (train, test, D_t, D_v), the label histogram of the training set
  where the labels can be read without reading the samples (the library's loaders; a DataLoader over a dataset
  with `targets` or `labels`, or a `TensorDataset`), and a SHA-256 of the samples at a few fixed indices as they
  are before augmentation: the stored images of `DeviceLoader`, the tensors of a `TensorDataset`. A `StreamLoader`
  gives the identity of those files (class folder, name, size) instead of their pixels, which only its worker
  processes decode. Any other dataset is left out: its `__getitem__` may draw random augmentations (and consume the
  random stream the run is seeded with) or read from disk, so reading it is neither deterministic nor cheap.
- **versions**: slimrarts and torch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..version import __version__

__all__ = ["differences", "fingerprint", "fixed_indices"]

FORMAT = 1
# the loaders a run reads and how messages name them
LOADERS = (("train", "the training set"), ("test", "the test set"), ("search_t", "the search half D_t"),
           ("search_v", "the search half D_v"))
SAMPLED = ("train", "test")  # the loaders whose samples at fixed indices are hashed
NO_SAMPLES = ("not recorded: the dataset is read through its own __getitem__, which may augment at random or read "
              "from disk (only DeviceLoader, StreamLoader and TensorDataset samples are hashed)")


def fixed_indices(n: int) -> list[int]:
    """The indices whose samples are hashed: the first, the last and two in between."""
    return sorted({0, n // 3, (2 * n) // 3, n - 1}) if n > 0 else []


def _feed(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def _model(model: nn.Module) -> dict:
    h = hashlib.sha256()
    out: dict[str, Any] = {"class": type(model).__name__}
    for kind, named in (("parameters", model.named_parameters()), ("buffers", model.named_buffers())):
        shapes = {}
        for name, t in named:
            shapes[name] = list(t.shape)
            _feed(h, name, t)
        out[kind] = shapes
    out["weights_sha256"] = h.hexdigest()
    return out


def _dataset(loader) -> Any:
    return getattr(loader, "dataset", None)


def _size(loader) -> int | None:
    n = getattr(loader, "num_samples", None)
    if n is None:
        dataset = _dataset(loader)
        n = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    return int(n) if n is not None else None


def _label_counts(loader) -> list[int] | None:
    own = getattr(loader, "label_counts", None)
    if callable(own):
        return own()
    dataset = _dataset(loader)
    labels = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    else:
        labels = next((getattr(dataset, a) for a in ("targets", "labels") if getattr(dataset, a, None) is not None),
                      None)
    try:
        labels = torch.as_tensor(labels) if labels is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
    if labels is None or labels.dim() != 1 or labels.dtype.is_floating_point or labels.numel() == 0 \
            or int(labels.min()) < 0:
        return None
    return torch.bincount(labels.long().cpu()).tolist()


def _samples(loader) -> dict | None:
    n = _size(loader)
    if not n:
        return None
    idx = fixed_indices(n)
    own = getattr(loader, "sample_digest", None)
    if callable(own):
        return {"indices": idx, "sha256": own(idx)}
    dataset = _dataset(loader)
    if isinstance(dataset, TensorDataset):
        h = hashlib.sha256()
        for k, t in enumerate(dataset.tensors):
            _feed(h, str(k), t[idx])
        return {"indices": idx, "sha256": h.hexdigest()}
    return None


def _data(loaders) -> dict:
    samples = {where: _samples(getattr(loaders, where, None)) for where in SAMPLED}
    out = {"sizes": {where: _size(getattr(loaders, where, None)) for where, _ in LOADERS},
           "train_labels": _label_counts(loaders.train), "samples": samples}
    if any(v is None for v in samples.values()):
        out["samples_note"] = NO_SAMPLES
    return out


def fingerprint(model: nn.Module | None, loaders) -> dict:
    """The fingerprint of a run starting from `model` (None: built from the recipe alone, e.g. a cell search's net)
    on `loaders` (a `Loaders`; None: no data part) with this slimrarts and torch."""
    return {"format": FORMAT, "versions": {"slimrarts": __version__, "torch": torch.__version__},
            "model": _model(model) if model is not None else None,
            "data": _data(loaders) if loaders is not None else None}


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _model_differences(old: dict, new: dict) -> list[str]:
    shapes, extra, missing = [], [], []
    for kind, word in (("parameters", "parameter"), ("buffers", "buffer")):
        a, b = old.get(kind, {}), new.get(kind, {})
        shapes += [f"{word} {name} has shape {_shape(b[name])} here, {_shape(a[name])} in the run"
                   for name in b if name in a and a[name] != b[name]]
        extra += [f"{word} {name} {_shape(b[name])} is not in the run's model" for name in b if name not in a]
        missing += [f"{word} {name} {_shape(a[name])} of the run's model is missing here"
                    for name in a if name not in b]
    out = shapes + extra + missing
    if out:
        shown = "; ".join(out[:3]) + (f" (and {len(out) - 3} more)" if len(out) > 3 else "")
        kinds = (new.get("class"), old.get("class"))
        which = f" ({kinds[0]} here, {kinds[1]} in the run)" if kinds[0] != kinds[1] else ""
        return [f"the model differs from the one this run started from{which}: {shown}"]
    if old.get("weights_sha256") != new.get("weights_sha256"):
        return [f"the starting weights differ from the run's (sha256 {new.get('weights_sha256', '?')[:12]}… here, "
                f"{old.get('weights_sha256', '?')[:12]}… in the run)"]
    return []


def _data_differences(old: dict, new: dict) -> list[str]:
    out = []
    for where, what in LOADERS:
        a, b = old.get("sizes", {}).get(where), new.get("sizes", {}).get(where)
        if a is not None and b is not None and a != b:
            out.append(f"{what} has {b} samples here, {a} in the run")
    a, b = old.get("train_labels"), new.get("train_labels")
    if a is not None and b is not None and a != b:
        width = max(len(a), len(b))
        a, b = a + [0] * (width - len(a)), b + [0] * (width - len(b))
        label = next(i for i in range(width) if a[i] != b[i])
        out.append(f"the training set's labels differ: label {label} has {b[label]} samples here, {a[label]} in "
                   "the run")
    for where, what in LOADERS:
        a, b = (old.get("samples") or {}).get(where), (new.get("samples") or {}).get(where)
        if a and b and a["indices"] == b["indices"] and a["sha256"] != b["sha256"]:
            out.append(f"{what}'s samples at indices {', '.join(map(str, b['indices']))} differ from the run's "
                       f"(sha256 {b['sha256'][:12]}… here, {a['sha256'][:12]}… in the run)")
    return out


def differences(stored: dict, here: dict) -> list[str]:
    """What differs between the fingerprint a run started with (`stored`) and this one (`here`), one phrase each
    ("the training set has 144 samples here, 200 in the run"); [] when every recorded part agrees. A part one side
    did not record (no model, a dataset whose samples are not hashed) is not compared."""
    out = []
    for lib, version in here.get("versions", {}).items():
        theirs = stored.get("versions", {}).get(lib)
        if theirs is not None and theirs != version:
            out.append(f"{lib} {version} here, {theirs} in the run")
    if stored.get("model") and here.get("model"):
        out += _model_differences(stored["model"], here["model"])
    if stored.get("data") and here.get("data"):
        out += _data_differences(stored["data"], here["data"])
    return out
