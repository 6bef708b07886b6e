"""SGD and Adam over foreach ops with the learning rate held in a device tensor.

torch.optim's SGD turns a tensor learning rate into a Python number (a host sync each step, and a value baked
into a captured CUDA graph). These keep the rate in a 0-d tensor on the parameters' device, updated with
`set_lr` between steps, so a step never syncs and can be captured. Both match torch.optim's update rules
(SGD with dampening 0; Adam with L2 weight decay, not AdamW); the tests check it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import InputError

__all__ = ["SGD", "Adam", "build_optimizer"]


class _DeviceLR(torch.optim.Optimizer):
    """Base: one 0-d learning-rate tensor per param group, on that group's device."""

    def __init__(self, params: Iterable, defaults: dict):
        super().__init__(params, defaults)
        self._lr_tensors: list[torch.Tensor] = []
        self._sync_lr_tensors()

    def _sync_lr_tensors(self) -> None:
        self._lr_tensors, self._lr_seen = [], []
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            self._lr_tensors.append(torch.tensor(float(group["lr"]), device=device))
            self._lr_seen.append(float(group["lr"]))

    def set_lr(self, lr: float, group: int | None = None) -> None:
        """Set the learning rate of one or all groups (an async device write, no sync)."""
        for i, g in enumerate(self.param_groups):
            if group is None or group == i:
                g["lr"] = float(lr)
                self._lr_tensors[i].fill_(float(lr))
                self._lr_seen[i] = float(lr)

    def _follow_lr(self) -> None:
        """Take up a learning rate written into `param_groups` directly (a `torch.optim.lr_scheduler`, a user's
        loop): compared as Python floats, so no sync; a step replayed from a CUDA graph sees only `set_lr`."""
        for i, g in enumerate(self.param_groups):
            if g["lr"] != self._lr_seen[i]:
                self._lr_tensors[i].fill_(float(g["lr"]))
                self._lr_seen[i] = float(g["lr"])

    def lr_tensor(self, group: int = 0) -> torch.Tensor:
        """The device tensor holding a group's learning rate (e.g. for proximal steps)."""
        return self._lr_tensors[group]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._sync_lr_tensors()

    @staticmethod
    def _with_grads(group: dict) -> tuple[list, list]:
        params = [p for p in group["params"] if p.grad is not None]
        return params, [p.grad for p in params]


class SGD(_DeviceLR):
    """SGD with momentum, optional Nesterov and L2 weight decay (torch.optim.SGD's rule, dampening 0)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        if lr <= 0:
            raise InputError(f"lr must be > 0, got {lr}")
        if nesterov and momentum <= 0:
            raise InputError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        self._follow_lr()
        for i, group in enumerate(self.param_groups):
            params, grads = self._with_grads(group)
            if not params:
                continue
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            momentum = group["momentum"]
            if momentum:
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
                update = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
            else:
                update = grads
            torch._foreach_sub_(params, torch._foreach_mul(update, self._lr_tensors[i]))
        return None


class Adam(_DeviceLR):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam's rule, not AdamW)."""

    # Why not torch.optim.Adam (measured for issue 21 with torch 2.14 on the CPU; how: that commit's message):
    # - a tensor learning rate with foreach needs capturable=True, which torch allows on CUDA/XPU/HPU only, so on
    #   the CPU it would take a Python float (a value baked into captured graphs) or the per-tensor loop;
    # - the update rule is the same (max |Δ| 9e-8 after one step, 1.5e-6 after 50 steps of 16-element tensors) but
    #   its rounding differs, and the golden 50-step search amplifies that: max |Δα| = 0.14 (float lr, foreach) and
    #   0.20 (tensor lr, per tensor) against this class, as much as this class with its learning rate changed by
    #   one part in 10^7 (0.17), so torch's Adam would not keep the trajectory (the 1e-6 bar);
    # - step time, 200 α-steps on ResNet-20's 9 α tensors, one thread: this class 0.97 ms, torch's float-lr foreach
    #   0.67 ms, torch's tensor-lr per-tensor 1.21 ms (each a median of 5 interleaved rounds).

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise InputError(f"lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise InputError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        self._follow_lr()
        for i, group in enumerate(self.param_groups):
            params, grads = self._with_grads(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            exp_avg, exp_avg_sq, steps = [], [], []
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg.append(state["exp_avg"])
                exp_avg_sq.append(state["exp_avg_sq"])
                steps.append(state["step"])
            torch._foreach_add_(steps, 1.0)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            # step size lr / (1 - beta1^t); denominator sqrt(v / (1 - beta2^t)) + eps
            bc1 = torch._foreach_sub(torch._foreach_pow(beta1, steps), 1.0)  # = -(1 - beta1^t)
            bc2 = torch._foreach_sqrt(torch._foreach_neg(torch._foreach_sub(torch._foreach_pow(beta2, steps), 1.0)))
            denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sq), bc2), group["eps"])
            step_size = torch._foreach_div([self._lr_tensors[i]] * len(bc1), bc1)  # = -lr / (1 - beta1^t)
            torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avg, step_size), denom)
        return None


def build_optimizer(params, cfg) -> SGD | Adam:
    """The optimizer a config asks for: an `OptimConfig` gives SGD (the weights'); an `ArchOptimConfig` gives Adam
    or SGD (α's), by its `optimizer` field."""
    params = list(params)
    kind = getattr(cfg, "optimizer", "sgd")
    if kind == "adam":
        return Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if kind != "sgd":
        raise InputError(f"optimizer {kind!r} is unknown; choose adam or sgd")
    return SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               nesterov=getattr(cfg, "nesterov", False))
