"""Training engine: the one epoch loop, fit/evaluate, callbacks, the capturable step, optimizers, schedules, run
folders, checkpoints, progress."""

from . import dist as dist
from .callbacks import Callback as Callback
from .callbacks import Event as Event
from .callbacks import LoopState as LoopState
from .callbacks import on as on
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import save_atomic as save_atomic
from .device import resolve_device as resolve_device
from .epochs import DivergenceError as DivergenceError
from .epochs import PhaseResult as PhaseResult
from .epochs import run_epochs as run_epochs
from .epochs import set_loader_epoch as set_loader_epoch
from .fit import FitResult as FitResult
from .fit import build_sgd as build_sgd
from .fit import evaluate as evaluate
from .fit import fit as fit
from .optim import SGD as SGD
from .optim import Adam as Adam
from .optim import build_optimizer as build_optimizer
from .progress import console as console
from .progress import make_progress as make_progress
from .rundir import RunDir as RunDir
from .rundir import default_run_dir as default_run_dir
from .rundir import prepare_run_dir as prepare_run_dir
from .schedule import lr_at as lr_at
from .schedule import schedule_fn as schedule_fn
from .step import TrainStep as TrainStep
from .step import autocast as autocast
from .step import batches_on as batches_on
from .task import CLASSIFICATION as CLASSIFICATION
from .task import Classification as Classification
from .task import Task as Task

__all__ = [
    "CLASSIFICATION", "Classification", "Task",
    "SGD", "Adam", "Callback", "DivergenceError", "Event", "FitResult", "LoopState", "PhaseResult", "RunDir",
    "TrainStep", "autocast", "batches_on", "build_optimizer", "build_sgd", "console", "default_run_dir", "dist",
    "evaluate",
    "fit", "load_checkpoint", "lr_at", "make_progress", "on", "prepare_run_dir", "resolve_device", "run_epochs",
    "save_atomic", "schedule_fn", "set_loader_epoch",
]
