"""Everything the loop does besides the step, as callbacks. :func:`build_callbacks` is the one place where the
config chooses them, and it fixes their order:

1. :class:`LRSchedule` -- the lr of each step;
2. :class:`NonFiniteLoss` -- a non-finite loss stops the run with a likely cause;
3. :class:`MaxNorm` -- ``optim.max_norm`` after each optimizer step;
4. :class:`BestOnValidation` -- model selection at each epoch's end (before the checkpoint that keeps it);
5. :class:`Logging` -- progress bar, epoch lines, ``log.jsonl``, TensorBoard;
6. :class:`StopOnSignal` -- SIGTERM / SIGUSR1 / ``checkpoint_minutes`` set the loop's control;
7. :class:`Checkpointing` -- epoch and mid-epoch checkpoints (after the control is set).
"""

from __future__ import annotations

from ...config import TrainConfig
from .base import Callback, Callbacks, Control
from .checkpointing import BestOnValidation, Checkpointing
from .guards import MaxNorm, NonFiniteLoss
from .logging import Logging
from .preemption import StopOnSignal
from .schedule import LRSchedule, lr_at


def build_callbacks(cfg: TrainConfig, device_type: str, signals: bool = True) -> Callbacks:
    """The run's callbacks in their fixed order. Host syncs (the non-finite check, the ranks agreeing on a stop)
    happen every step on the CPU and every 25 steps on GPUs. ``signals=False`` leaves out :class:`StopOnSignal`
    (the other cells of a pack: its first cell watches, and the pack copies its control to them)."""
    every = 1 if device_type == "cpu" else 25
    chosen = [LRSchedule(), NonFiniteLoss(every)]
    if cfg.optim.max_norm:
        chosen.append(MaxNorm(cfg.optim.max_norm))
    chosen += [BestOnValidation(), Logging()]
    if signals:
        chosen.append(StopOnSignal(every, cfg.optim.accumulate, cfg.checkpoint_minutes))
    chosen.append(Checkpointing())
    return Callbacks(chosen)


__all__ = ["Callback", "Callbacks", "Control", "BestOnValidation", "Checkpointing", "MaxNorm", "NonFiniteLoss",
           "Logging", "StopOnSignal", "LRSchedule", "build_callbacks", "lr_at"]
