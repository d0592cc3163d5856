"""Preemption as a callback: SIGTERM / SIGUSR1 (and ``checkpoint_minutes``) ask the loop for a mid-epoch checkpoint
and a stop; every rank agrees on the same step (:class:`ccar.engine.preemption.StopSignals`)."""

from __future__ import annotations

import time

from ..preemption import StopSignals
from .base import Callback


class StopOnSignal(Callback):
    """Looks at the signals (and the checkpoint clock) every ``every`` optimizer steps -- every step in one
    process -- and sets the loop's control: ``save`` (and ``stop`` on a signal). Stops wait for the end of an
    accumulation group, so that a resumed run computes what the uninterrupted one would have."""

    def __init__(self, every: int, accumulate: int, minutes: float):
        self.every, self.accumulate, self.minutes = every, accumulate, minutes

    def on_fit_start(self, trainer) -> None:
        self.signals = StopSignals(trainer.run.dist).__enter__()

    def teardown(self, trainer) -> None:
        if hasattr(self, "signals"):
            self.signals.__exit__(None, None, None)

    def on_step_end(self, trainer, batch, out) -> None:
        i, state = batch.index, trainer.state
        if not out.stepped or ((i + 1) % (self.every * self.accumulate) and trainer.run.dist.enabled):
            return
        due = bool(self.minutes) and time.monotonic() - state.last_save > 60 * self.minutes
        signum, timed = self.signals.agreed(trainer.run.device, due)
        if (signum or timed) and i + 1 < trainer.steps:  # (at the epoch's end the epoch checkpoint follows)
            state.control.save, state.control.stop = True, signum
