"""Width search inside a Lightning `Trainer.fit` (optional extra: `pip install slimrarts[lightning]`).

    from slimrarts.integrations.lightning import WidthSearchCallback, load_slim_checkpoint

    search = WidthSearchCallback(example_input, method="joint", budget={"macs": "50%"})
    Trainer(max_epochs=30, callbacks=[search]).fit(module, datamodule=dm)   # α learned with your loop; cut at the end
    Trainer(max_epochs=10, callbacks=[search]).fit(module, datamodule=dm)   # fine-tuning: a second fit, slim model
    module = load_slim_checkpoint(MyModule(...), "last.ckpt")               # a checkpoint saved after the cut

The callback drives a `slimrarts.WidthSearch` over your LightningModule (or its submodule `module=`) for the
one-net methods, those that learn with your weights and your optimizer:
- `joint`: α is stepped once per optimizer step, with the gradient your training step's backward left in it (every
  micro-batch of a gradient accumulation adds to it; a GradScaler's scale is divided out, and a step the scaler
  skips is skipped for α too; under DDP α's gradients are averaged, as DDP averages your weights');
- `joint` with `prune.mode: l1` (the ℓ1 shrink of α) and `slimming` (Network Slimming's s·‖γ‖₁ on BN γ, added to
  γ's gradient after the GradScaler unscaled it).
RARTS and the other two-net methods keep a second copy of the weights and their own optimizers: drive them with
`WidthSearch.step` in your own loop (`examples/rarts_in_your_loop.py`).

At the end of that fit (`on_train_end`, the model still on its device) the callback selects the channels, removes
them for real and re-estimates the BatchNorm statistics on training batches. Lightning's optimizers and its DDP
wrapper still hold the old parameters then, so fine-tuning is a second `Trainer.fit` of the same module. Every
checkpoint saved from then on by a Trainer with this callback holds the width spec (`checkpoint["slimrarts"]`):
`load_slim_checkpoint` rebuilds the slim module from a freshly built dense one.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError, MissingExtraError
from ..methods import get_method
from ..width import apply_spec
from ..widthsearch import REGULARIZED, WidthSearch

try:
    import lightning.pytorch as pl
except ImportError as err:  # the extra is optional: name it
    raise MissingExtraError("slimrarts.integrations.lightning needs Lightning 2.x: pip install "
                            "'slimrarts[lightning]' (or pip install 'lightning>=2.5,<2.7')") from err

__all__ = ["CHECKPOINT_KEY", "WidthSearchCallback", "load_slim_checkpoint"]

CHECKPOINT_KEY = "slimrarts"  # the checkpoint entry holding the width spec and the submodule it applies to


class WidthSearchCallback(pl.Callback):
    """Learn α with your LightningModule's training and cut the model at the end of `Trainer.fit`.

    Args:
        example_input: a float batch of inputs (moved to the module's device; the trace reads its first 2).
        method: `joint` (default) or `slimming`; the search's settings (λ of the cost term, α's optimizer and
            learning rate, `prune.mode: l1`, `baselines.sparsity`) come from `config`, as for `WidthSearch`.
        scope, config, task, loss_fn, metric_fn: as `slimrarts.WidthSearch` takes them.
        module: the name of the submodule to search (`"net"` for `self.net`); default the LightningModule itself.
        ratio, budget, mode: the cut (default the config's `prune` section), as `WidthSearch.cut` takes them.
        recalibrate: `True` re-estimates the BatchNorm statistics on the Trainer's training batches after the cut
            (`batches` of them, default `prune.recalibrate`), an iterable of batches uses those, `False` keeps them.

    After the cut, `spec` is the width spec and `search` the `WidthSearch` (its `keep`, `alphas`).
    """

    def __init__(self, example_input: torch.Tensor, *, method: str = "joint", scope: str | list[str] | None = None,
                 config: Any = None, module: str | None = None, ratio: float | None = None,
                 budget: dict | None = None, mode: str | None = None, recalibrate: bool | Iterable = True,
                 batches: int | None = None, task: Any = None, loss_fn: Callable | None = None,
                 metric_fn: Callable | None = None):
        info = get_method(method)
        if info.two_nets or info.data == "split" or not (info.has_alpha or info.name in REGULARIZED):
            raise InputError(f"WidthSearchCallback: method {method!r} is not a one-net search that trains with your "
                             f"weights (allowed: joint, {', '.join(REGULARIZED)}); drive two-net methods such as "
                             "rarts with WidthSearch.step in your own loop (examples/rarts_in_your_loop.py)")
        if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
            raise InputError("WidthSearchCallback: example_input must be a float tensor batch of your inputs")
        self.example, self.method, self.scope, self.config, self.module = example_input, method, scope, config, module
        self.cut_args = {"ratio": ratio, "budget": budget, "mode": mode}
        self.recalibrate, self.batches = recalibrate, batches
        self.task, self.loss_fn, self.metric_fn = task, loss_fn, metric_fn
        self.search: WidthSearch | None = None
        self.spec: dict | None = None
        self._pending: dict | None = None  # a checkpoint's search state, loaded once the search exists
        self._restoring_fit = False  # the checkpoint being restored is a fit's (not validate's or test's)
        self._cut_module: weakref.ref | None = None  # the module this callback cut
        self._drives: set[int] = set()  # ids of the searched module's parameters
        self._driving = None

    def _target(self, pl_module: nn.Module) -> nn.Module:
        return pl_module if self.module is None else pl_module.get_submodule(self.module)

    # ---- the search -----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        target = self._target(pl_module)
        if self.spec is not None:  # the fine-tuning fit of the slim model: nothing left to search
            cut = self._cut_module() if self._cut_module is not None else None
            if cut is not None and cut is not target:
                raise InputError("WidthSearchCallback: this callback has cut another module already; its width "
                                 "spec would be written into this one's checkpoints. Make a new WidthSearchCallback "
                                 "for a new search")
            return
        _check_strategy(trainer)
        if self.module is None and type(pl_module).forward is pl.LightningModule.forward:
            raise InputError(f"WidthSearchCallback: {type(pl_module).__name__} has no forward() to trace; define "
                             "one, or name the network to search: WidthSearchCallback(..., module='net') for "
                             "self.net")
        params = list(target.parameters())
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
            raise InputError(f"WidthSearchCallback: the module's weights are {params[0].dtype} (a '*-true' "
                             "precision); α and the search need float32 weights: use a mixed precision "
                             "(precision='bf16-mixed' or '16-mixed')")
        x = self.example.to(params[0].device)
        pending, self._pending = self._pending, None
        self.search = WidthSearch(target, x, method=self.method, scope=self.scope, config=self.config,
                                  task=self.task, loss_fn=self.loss_fn, metric_fn=self.metric_fn,
                                  init_weights=pending is None)  # a resumed fit's weights were started already
        if pending is not None:
            self.search.load_state_dict(pending)
        self._drives = {id(p) for p in params}
        self._driving = None  # the optimizer that drives α: found at its first step (optimizers exist by then)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Once per optimizer step (Lightning calls it after the last accumulated backward and after unscaling
        your optimizer's gradients): α's step, or slimming's subgradient. The optimizer that drives it is the first
        of the Trainer's that holds the searched module's parameters."""
        if self.search is None or self.spec is not None or optimizer is not self._driver(trainer):
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaled = scaler is not None and scaler.is_enabled()
        if scaled and self.search.penalty is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise InputError("WidthSearchCallback: slimming adds its penalty to unscaled gradients, but this "
                             f"optimizer ({type(optimizer).__name__}, fused) is stepped on scaled ones under the "
                             "GradScaler; use a non-fused optimizer or precision='bf16-mixed'")
        self.search.regularize(grad_scale=scaler.get_scale() if scaled else None)

    def _driver(self, trainer):
        """Found once per fit (not each step); `on_fit_start` resets it."""
        if self._driving is None:
            self._driving = next((opt for opt in trainer.optimizers if any(
                id(p) in self._drives for g in opt.param_groups for p in g["params"])), None)
        return self._driving

    def on_train_end(self, trainer, pl_module) -> None:
        """The cut, while the model is still on its device."""
        if self.search is None or self.spec is not None:
            return
        loader = self.recalibrate or None
        if loader is True:
            loader = trainer.train_dataloader
            if isinstance(loader, (dict, list, tuple)):
                raise InputError("WidthSearchCallback: the Trainer has several training loaders; pass the batches "
                                 "to re-estimate the BatchNorm statistics on: recalibrate=<an iterable of "
                                 "(images, targets)>, or recalibrate=False")
        self.search.cut(**self.cut_args, recalibrate=loader, batches=self.batches)
        self.spec = self.search.spec
        self._cut_module = weakref.ref(self._target(pl_module))

    def on_exception(self, trainer, pl_module, exception) -> None:
        """A fit that fails before the cut: the gates come off, so the module is as it was trained (a new fit
        starts a new search)."""
        if self.search is not None and self.spec is None:
            self.search.gates.remove()
            self.search.gates.unguard()
            self.search = None

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.spec is not None:
            return {"spec": json.dumps(self.spec)}
        return {"search": self.search.state_dict(weights=False)} if self.search is not None else {}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._restoring_fit = trainer.state.fn == "fit"

    def load_state_dict(self, state_dict: dict) -> None:
        if "spec" in state_dict:
            self.spec = json.loads(state_dict["spec"])
        elif "search" in state_dict and self._restoring_fit:  # validate/test from a mid-search checkpoint: ignored
            self._pending = state_dict["search"]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.spec is not None:
            checkpoint[CHECKPOINT_KEY] = {"width_spec": json.dumps(self.spec), "module": self.module}


def _check_strategy(trainer) -> None:
    """One process, or DDP started by Lightning's own launcher or torchrun (not spawned: a spawned worker's slim
    weights are copied back into the main process's dense module)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    spawned = getattr(strategy, "_start_method", "popen") != "popen"
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy) or spawned:
        raise InputError(f"WidthSearchCallback: strategy {type(strategy).__name__}"
                         f"{' (spawned processes)' if spawned else ''} is not supported; use one device or "
                         "strategy='ddp' (FSDP and DeepSpeed shard or flatten the weights the cut removes)")


def load_slim_checkpoint(module: nn.Module, path: str, *, map_location: Any = "cpu",
                         weights_only: bool = True) -> nn.Module:
    """Cut `module` (freshly built, dense: the architecture the search started from) to the width spec a checkpoint
    saved after the cut holds, then load the checkpoint's weights into it; returns it (cut in place).

    A checkpoint saved before the cut has no width spec and is refused. `weights_only=False` for a checkpoint
    whose hyperparameters torch's safe loader refuses (only for files you trust)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    entry = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if entry is None:
        raise InputError(f"{path}: this checkpoint holds no slimrarts width spec: it was saved before the cut (load "
                         "it with your LightningModule as usual), or from a slim module by a Trainer without the "
                         "WidthSearchCallback that cut it (save it from a Trainer with callbacks=[that callback])")
    spec = json.loads(entry["width_spec"])
    target = module if entry.get("module") is None else module.get_submodule(entry["module"])
    apply_spec(target, spec)
    module.load_state_dict(ckpt["state_dict"])
    return module
