"""A trial's watcher as a training-loop callback (:class:`ccar.engine.callbacks.Callback`), appended to an
ordinary run's callbacks, so the engine itself is unchanged: at each epoch's end it reports the validation
objective to the search (its pruner may stop the trial there), and at every step it stops the run once the
deadline has passed. The epoch's checkpoint is already written when it stops a run (it runs last), so a later
trial with the same settings continues from there."""

from __future__ import annotations

import time
from typing import Callable, Optional

from ..engine.callbacks import Callback
from ..engine.scoring import evaluate_split
from ..errors import CCARError


class TrialStopped(CCARError):
    """A trial stopped early: ``reason`` is ``pruned`` (the pruner) or ``deadline`` (the budget's end)."""

    def __init__(self, reason: str, epoch: int):
        super().__init__(f"{reason} after epoch {epoch}")
        self.reason, self.epoch = reason, epoch


class TrialMonitor(Callback):
    """``report(step, value) -> bool`` (True: prune) gets the objective of each epoch's validation scores,
    ``step`` = the epoch plus ``offset``; ``score(metrics, class_counts) -> value`` computes it (None: the balanced accuracy the
    loop already measured is the objective). ``report=None``: nothing reported, only the deadline watched.
    ``deadline``: a ``time.monotonic()`` value."""

    def __init__(self, report: Optional[Callable[[int, float], bool]], deadline: float,
                 score: Optional[Callable[[dict], Optional[float]]] = None, offset: int = 0):
        self.report, self.deadline, self.score, self.offset = report, deadline, score, offset
        self.epochs = 0

    def on_step_end(self, trainer, batch, out) -> None:
        if time.monotonic() > self.deadline:
            raise TrialStopped("deadline", trainer.state.epoch)

    def on_epoch_end(self, trainer, record) -> None:
        self.epochs = trainer.state.epoch + 1
        if self.report is None or record.get("val_balanced") is None:
            return
        value = record["val_balanced"]
        if self.score is not None:
            value = self.score(evaluate_split(trainer.run, trainer.run.data.val, shifts=False),
                               trainer.run.data.class_counts)
        if value is not None and self.report(self.epochs + self.offset, float(value)):
            raise TrialStopped("pruned", self.epochs)
        if time.monotonic() > self.deadline:
            raise TrialStopped("deadline", self.epochs)
