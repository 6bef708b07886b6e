"""Many processes: the one module that talks to `torch.distributed` (joining torchrun's group, ranks, collectives).

The rest of slimrarts asks this module, never `torch.distributed` directly. Without a process group (a plain
`python` or `slimrarts` run) every helper returns at once: no collective, no copy, results bitwise as before.

`init()` joins the group `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), over NCCL when this process trains on a GPU (each process on `cuda:LOCAL_RANK`) and gloo on CPUs.
Collectives: `all_reduce_` averages or sums tensors in place through a few flat buckets (one all-reduce per bucket,
issued together); `any_true` agrees on a flag (a divergence, a stopping rule); `broadcast_object` and `from_main`
give every rank what rank 0 has or computes (a checkpoint, a selection made by timing), and re-raise rank 0's error
on every rank so none waits for a partner that has failed.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from ..errors import InputError, PeerFailure

__all__ = ["BUCKET_BYTES", "DEFAULT_TIMEOUT_S", "PeerError", "RemoteError", "active", "all_reduce_", "any_true",
           "backend", "barrier", "broadcast_object", "choose_backend", "convert_sync_bn", "describe", "from_main",
           "init", "is_main", "launched", "local_main_first", "local_rank", "local_world_size", "peer_errors", "rank",
           "revert_sync_bn", "shutdown", "sum_int", "sync_buffers_", "world_size", "wrap_ddp"]

BUCKET_BYTES = 25 * 2**20  # as DDP's default bucket: bounds the extra memory of the flat copies
DEFAULT_TIMEOUT_S = 1800  # how long a collective waits for a silent partner before failing (gloo's default)
_T = TypeVar("_T")


def launched() -> bool:
    """Whether a launcher such as `torchrun` started this process as one rank of a group (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether this process belongs to an initialised process group (ours or one the user made)."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes run folders, checkpoints, metrics and reports (True without a group)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 without a group)."""
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def local_world_size() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a group)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if active() else 1


def backend() -> str | None:
    return str(tdist.get_backend()) if active() else None


def describe() -> dict:
    """What the run folder records about the processes: world size, backend, this node's share."""
    return {"world_size": world_size(), "backend": backend(), "local_world_size": local_world_size()}


def _wants_cuda(device: str | torch.device) -> bool:
    spec = str(device)
    return spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())


def choose_backend(device: str | torch.device, asked: str = "auto") -> str:
    """NCCL for a CUDA device, gloo otherwise (`asked` other than auto is taken as it is, after a check)."""
    if asked == "auto":
        return "nccl" if _wants_cuda(device) else "gloo"
    if asked == "nccl" and not _wants_cuda(device):
        raise InputError(f"dist.backend=nccl needs a CUDA device, but the run's device is {str(device)!r}; use "
                         "dist.backend=auto or gloo")
    return asked


def init(device: str | torch.device = "auto", *, backend: str = "auto",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes in the environment; True when this process is now in one.

    Does nothing (False) outside a launcher, and nothing more when a group exists already. On CUDA each process
    takes `cuda:LOCAL_RANK` as its current device before the group is made (NCCL needs it). `timeout_s` bounds how
    long any collective waits for a partner, so a rank that hangs cannot hold the others forever.
    """
    if active():
        return True
    if not launched():
        return False
    if str(device).startswith("cuda:") and int(os.environ["WORLD_SIZE"]) > 1:
        raise InputError(f"device {str(device)!r} pins one GPU, but torchrun started {os.environ['WORLD_SIZE']} "
                         "processes that each take cuda:LOCAL_RANK; set device to cuda or auto")
    chosen = choose_backend(device, backend)
    device_id = None
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise InputError(f"device {str(device)!r} was asked for but CUDA is not available here")
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device_id)
    tdist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return True


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank leaves while another still needs it). Objects that hold
    the group (a finished phase's DistributedDataParallel) are collected first, while the group still exists."""
    if active():
        gc.collect()
        tdist.barrier()
        tdist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where small control tensors live for collectives: the current GPU under NCCL, else the CPU."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        tdist.barrier()


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the other ranks (e.g. decode and cache a data set
    once per node, the others then read the cache)."""
    if not active():
        yield
        return
    if local_rank() != 0:
        tdist.barrier()
    yield
    if local_rank() == 0:
        tdist.barrier()


def _buckets(tensors: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one device and dtype, each at most `limit` bytes (or one larger tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last is None or (last[0].device, last[0].dtype) != (t.device, t.dtype) or size + nbytes > limit:
            out.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return out


@torch.no_grad()
def all_reduce_(tensors: Iterable[torch.Tensor], op: str = "mean", *,
                bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average (`mean`) or add up (`sum`) each tensor across the ranks, in place.

    The tensors go through flat buckets (one all-reduce per bucket, all issued before the first wait), so a
    network's gradients take a few collectives, not one per tensor. Without a group: nothing happens.
    """
    if not active():
        return
    if op not in ("mean", "sum"):
        raise InputError(f"op must be 'mean' or 'sum', got {op!r}")
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return
    pending = []
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        pending.append((bucket, flat, tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, async_op=True)))
    n = world_size()
    for bucket, flat, work in pending:
        work.wait()
        if op == "mean":
            flat.div_(n)
        parts = flat.split([t.numel() for t in bucket])
        torch._foreach_copy_(bucket, [v.view_as(t) for v, t in zip(parts, bucket, strict=True)])


def sync_buffers_(buffers: Iterable[torch.Tensor]) -> None:
    """Average the floating buffers (BN running statistics) across the ranks, so every rank holds the same model.

    Running statistics never feed back into training-mode steps and their update is linear in each batch's
    statistics, so averaging them once per epoch equals averaging them after every step.
    """
    if active():
        all_reduce_([b for b in buffers if b.is_floating_point()], "mean")


def any_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one tiny all-reduce; no collective without a group)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], device=_collective_device(), dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def sum_int(value: int) -> int:
    """`value` added up over the ranks (e.g. samples seen per epoch); `value` itself without a group."""
    if not active():
        return value
    t = torch.tensor([value], device=_collective_device(), dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return int(t.item())


def broadcast_object(obj: _T, src: int = 0) -> _T:
    """Rank `src`'s `obj` (anything picklable; tensors best on the CPU) on every rank."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


class PeerError(PeerFailure):
    """A collective failed: another process of the group died, was stopped, or stopped answering within the timeout."""


_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "NCCL", "Timed out",
                 "timed out", "timeout")


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Re-raise a failed collective as `PeerError` with what to do next (the run folder keeps its last checkpoint)."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not active() or not (isinstance(err, tdist.DistError) or any(m in text for m in _PEER_MARKERS)):
            raise
        raise PeerError(f"process {rank()} of {world_size()} lost its partners in a collective (another process "
                        f"failed, was stopped or hangs; its own error is in its log): {text.splitlines()[0][:300]}. "
                        "The run folder keeps the last complete epoch: continue with --resume") from err


class RemoteError(RuntimeError):
    """Rank 0 failed in work done for every rank; its error (type and message) is re-raised on the other ranks."""


def _portable(err: BaseException) -> BaseException:
    """`err` itself when it survives pickling, else a RemoteError with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - exceptions whose __init__ takes other arguments than their args
        return RemoteError(f"{type(err).__name__}: {err}")


def from_main(fn: Callable[[], _T]) -> _T:
    """`fn()` computed on rank 0 and given to every rank (e.g. reading a checkpoint, a selection made by timing).

    If `fn` raises on rank 0, every rank raises that error (the same type when it pickles, else `RemoteError`),
    so no rank waits for a result that will not come. Without a group, simply `fn()`.
    """
    if not active():
        return fn()
    result: tuple[bool, Any] | None = None
    if is_main():
        try:
            result = (True, fn())
        except Exception as err:  # noqa: BLE001 - handed to every rank, raised there
            result = (False, err)
            box = [(False, _portable(err))]
            tdist.broadcast_object_list(box, src=0)
            raise
    box = [result]
    tdist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its batch norms as `SyncBatchNorm` (batch statistics over all ranks; CUDA only), sharing the
    parameters and buffers; `revert_sync_bn` undoes it."""
    kinds = {name: type(m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.SyncBatchNorm):
            m._plain_class = kinds.get(name, torch.nn.BatchNorm2d)
    return model


def revert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    """`SyncBatchNorm` layers back to the batch norms they were made from (same parameters and buffers), so the
    model trains and loads without a process group."""
    sync = torch.nn.SyncBatchNorm
    if isinstance(model, sync):
        return _plain(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, sync):
                setattr(parent, name, _plain(child))
    return model


def _plain(m: torch.nn.SyncBatchNorm) -> torch.nn.Module:
    cls = getattr(m, "_plain_class", torch.nn.BatchNorm2d)
    out = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if m.affine:
        out.weight, out.bias = m.weight, m.bias
    out.running_mean, out.running_var, out.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
    out.train(m.training)
    return out


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` inside `DistributedDataParallel` (gradients averaged during backward), or `model` itself without a
    group. Buffers are not broadcast from rank 0 at each forward: each rank normalises its own batch, and the
    phase averages the running statistics at the epoch's end (`sync_buffers_`)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)
