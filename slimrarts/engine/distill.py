"""Knowledge distillation for fine-tuning: Hinton's loss against a frozen teacher, computed in fp32.

    loss = (1 − w)·CE(student, y) + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T))

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015). Conventions: KL(p_t ‖ p_s) =
Σ_c p_t,c (log p_t,c − log p_s,c), averaged over the batch (`kl_div(..., reduction="batchmean")`); w weights the
soft term and 1 − w the hard one, so w = 0 is plain cross-entropy; T² keeps the soft term's gradients on the scale
of the hard one's as T changes. The teacher runs in eval mode under `no_grad` with `requires_grad_(False)`: it gets
no gradients and no optimizer state. (`inference_mode` would not do: its tensors cannot be saved for the backward
pass of the KL term.) Nothing here reads a tensor back to the host.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError, InputTypeError

__all__ = ["Distiller", "distillation_loss"]


def _check(weight: float, temperature: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"distillation weight must be in [0, 1], got {weight}")
    if not temperature > 0.0:
        raise InputError(f"distillation temperature must be > 0, got {temperature}")


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def distillation_loss(student, teacher: torch.Tensor, target: torch.Tensor, *, weight: float = 0.5,
                      temperature: float = 4.0) -> torch.Tensor:
    """(1 − weight)·CE(student, target) + weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), in fp32.

    `student` may be a model's tuple output (its first element is used); `teacher` is detached. Autocast is turned
    off inside, so the loss is fp32 whatever the logits' dtype.
    """
    _check(weight, temperature)
    s = _logits(student)
    with torch.autocast(device_type=s.device.type, enabled=False):
        s, t = s.float(), teacher.detach().float()
        hard = F.cross_entropy(s, target)
        if weight == 0.0:
            return hard
        soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                        reduction="batchmean", log_target=True)
        return (1.0 - weight) * hard + (weight * temperature ** 2) * soft


class Distiller:
    """A frozen teacher and the distillation loss, usable as `TrainStep(loss_fn=...)`.

    `attach(student)` registers a forward pre-hook on the student that, in training mode, runs the teacher on the
    same input and keeps its logits; calling the distiller as `loss_fn(out, target)` then uses them. The teacher is
    not a submodule of the student, so the student's parameters, optimizer and checkpoints are unchanged. Under
    autocast the teacher runs in the autocast dtype too; the loss is always fp32.

    Example:
        >>> distiller = Distiller(dense_model, weight=0.5, temperature=4.0).attach(slim_model)
        >>> step = TrainStep(slim_model, optimizer, device=device, loss_fn=distiller)
    """

    def __init__(self, teacher: nn.Module, *, weight: float = 0.5, temperature: float = 4.0):
        _check(weight, temperature)
        if not isinstance(teacher, nn.Module):
            raise InputTypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)
        self._stash: torch.Tensor | None = None
        self._handle = None

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on `x`: eval mode, no graph, on `x`'s device (moved there once if need be)."""
        if self.teacher.training:  # someone called .train() on the whole tree: keep BN statistics and dropout fixed
            self.teacher.eval()
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            return _logits(self.teacher(x)).detach()

    def loss(self, out, target: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(out, teacher_logits, target, weight=self.weight, temperature=self.temperature)

    def attach(self, student: nn.Module) -> Distiller:
        """Run the teacher with each training-mode forward of `student`."""
        self.detach()

        def hook(module, args):
            if module.training:
                self._stash = self.teacher_logits(args[0])

        self._handle = student.register_forward_pre_hook(hook, prepend=True)  # the batch as the loader gave it
        return self

    def detach(self) -> None:
        """Remove the hook from the student."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._stash = None

    def __call__(self, out, target: torch.Tensor) -> torch.Tensor:
        if self._stash is None:
            raise RuntimeError("no teacher logits for this batch: attach() the distiller to the student and run the "
                               "student in training mode, or call loss(out, target, teacher_logits)")
        logits, self._stash = self._stash, None
        return self.loss(out, target, logits)
