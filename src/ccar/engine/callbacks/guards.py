"""Guards around the step: non-finite losses stop the run with a likely cause; MaxNorm keeps classifier rows
bounded (weight balancing, Alshammari et al. 2022)."""

from __future__ import annotations

import torch

from ...errors import TrainingError
from ..decoupling import project_max_norm
from .base import Callback


class NonFiniteLoss(Callback):
    """Stops the run at the first non-finite loss. Each step's check stays on the device; the flags are read every
    ``every`` steps (one host sync per check, not per step, on GPUs) and at the epoch's end."""

    def __init__(self, every: int):
        self.every = every

    def on_epoch_start(self, trainer) -> None:
        self.flags = torch.zeros(trainer.steps, dtype=torch.bool, device=trainer.run.device)
        self.checked = trainer.state.step  # steps before this one are known to have finite losses

    def on_step_end(self, trainer, batch, out) -> None:
        i = batch.index
        self.flags[i] = ~torch.isfinite(out.loss)
        if (i + 1) % self.every and i + 1 != trainer.steps:
            return
        if self.flags[self.checked: i + 1].any():
            bad = self.checked + int(self.flags[self.checked: i + 1].nonzero()[0])
            raise TrainingError(_message(trainer, bad, out.loss.item(), batch.x))
        self.checked = i + 1


def _message(trainer, step: int, value: float, x: torch.Tensor) -> str:
    lr, dtype = trainer.state.lr, trainer.run.precision.dtype
    if not torch.isfinite(x).all():
        cause = "the input batch itself holds NaN/Inf (bad data)"
    elif dtype == torch.float16:
        cause = "fp16 overflow (try amp=bf16 or amp=off)"
    else:
        cause = f"a learning rate too high for this model/loss (lr was {lr:.4g}; try optim.lr={lr / 10:.3g})"
    return (f"non-finite loss {value} at epoch {trainer.state.epoch + 1}, step {step + 1}; likely cause: {cause}. "
            f"The last good checkpoint is kept in {trainer.run.run_dir}; fix the cause and rerun with --resume")


class MaxNorm(Callback):
    """``optim.max_norm``: after every optimizer step each classifier row is projected to norm <= max_norm."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_step_end(self, trainer, batch, out) -> None:
        if out.stepped:
            project_max_norm(trainer.run.model, self.max_norm)
