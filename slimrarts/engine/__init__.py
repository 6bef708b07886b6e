"""Training engine: fit/evaluate, the capturable step, optimizers, schedules, checkpoints, progress."""

from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_atomic as save_atomic
from .loop import FitResult as FitResult
from .loop import build_sgd as build_sgd
from .loop import evaluate as evaluate
from .loop import fit as fit
from .loop import resolve_device as resolve_device
from .loop import set_loader_epoch as set_loader_epoch
from .optim import SGD as SGD
from .optim import Adam as Adam
from .progress import console as console
from .progress import make_progress as make_progress
from .schedule import lr_at as lr_at
from .step import TrainStep as TrainStep
from .step import autocast as autocast
from .step import batches_on as batches_on

__all__ = [
    "Adam", "FitResult", "SGD", "TrainStep", "autocast", "batches_on", "build_sgd", "console", "evaluate", "fit",
    "load_checkpoint", "lr_at", "make_progress", "resolve_device", "save_atomic", "set_loader_epoch",
]
