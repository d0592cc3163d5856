"""The learning-rate schedule as a callback: the lr of every step, set on the optimizer before the step."""

from __future__ import annotations

import math

import torch

from ...config import OptimConfig
from ...errors import ConfigError
from .base import Callback


def lr_at(o: OptimConfig, epochs: int, t: float) -> float:
    """Learning rate for the step that ends at fractional epoch ``t`` (> 0): linear warm-up, then cosine,
    multistep (x ``decay`` at each milestone epoch) or constant.

    >>> o = OptimConfig(lr=0.1, warmup_epochs=5, schedule="multistep", milestones=[160, 180], decay=0.01)
    >>> [round(lr_at(o, 200, t), 6) for t in (1.0, 5.5, 160.5, 199.9)]
    [0.02, 0.1, 0.001, 1e-05]
    """
    if o.warmup_epochs > 0 and t <= o.warmup_epochs:
        return o.lr * t / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(1e-9, epochs - o.warmup_epochs)
        return 0.5 * o.lr * (1.0 + math.cos(math.pi * min(1.0, (t - o.warmup_epochs) / span)))
    if o.schedule == "multistep":
        return o.lr * o.decay ** sum(int(t) >= m for m in o.milestones)
    if o.schedule == "constant":
        return o.lr
    raise ConfigError(f"optim.schedule must be cosine, multistep or constant; got {o.schedule!r}")


class LRSchedule(Callback):
    """Each parameter group at the schedule's lr times its ``lr_scale`` (``optim.backbone_lr``)."""

    def on_step_start(self, trainer, index: int) -> None:
        cfg, state = trainer.run.cfg, trainer.state
        state.lr = lr_at(cfg.optim, cfg.epochs, state.epoch + (index + 1) / trainer.steps)
        for group in trainer.step.optimizer.param_groups:
            lr = state.lr * group.get("lr_scale", 1.0)  # checkpoints before backbone_lr have none
            if torch.is_tensor(group["lr"]):  # a CUDA graph's optimizer reads it on the device
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
