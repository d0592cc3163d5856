"""The callback protocol: hooks the loop calls, and the control flags callbacks set for the loop to act on (as
Hugging Face's ``TrainerControl``: a callback asks, the loop does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

# Hooks receive the Trainer (ccar.engine.trainer), the Batch and the StepOutput (ccar.engine.step): callbacks sit
# below the trainer and import nothing of it.


@dataclass
class Control:
    """Requests for the loop, reset before every step: ``save`` a mid-epoch checkpoint after this step, then
    ``stop`` on that signal (0: go on)."""

    save: bool = False
    stop: int = 0

    def reset(self) -> None:
        self.save, self.stop = False, 0


class Callback:
    """A recipe or service plugged into the loop. Every hook is optional; ``teardown`` runs however the fit ends
    (an error, a stop), the others in the loop's order:

    ``on_fit_start`` → per epoch: ``on_epoch_start`` → per batch: ``on_step_start``, the step, ``on_step_end`` →
    ``on_epoch_end(record)`` → ``on_fit_end`` → ``teardown``.
    """

    def on_fit_start(self, trainer) -> None: ...

    def on_epoch_start(self, trainer) -> None: ...

    def on_step_start(self, trainer, index: int) -> None: ...

    def on_step_end(self, trainer, batch, out) -> None: ...

    def on_epoch_end(self, trainer, record: Dict[str, object]) -> None: ...

    def on_fit_end(self, trainer) -> None: ...

    def teardown(self, trainer) -> None: ...


class Callbacks(Callback):
    """Callbacks called in their list's order (:func:`ccar.engine.callbacks.build_callbacks` fixes it)."""

    def __init__(self, callbacks: List[Callback]):
        self.items = list(callbacks)

    def __iter__(self):
        return iter(self.items)

    def on_fit_start(self, trainer):
        for c in self.items:
            c.on_fit_start(trainer)

    def on_epoch_start(self, trainer):
        for c in self.items:
            c.on_epoch_start(trainer)

    def on_step_start(self, trainer, index):
        for c in self.items:
            c.on_step_start(trainer, index)

    def on_step_end(self, trainer, batch, out):
        for c in self.items:
            c.on_step_end(trainer, batch, out)

    def on_epoch_end(self, trainer, record):
        for c in self.items:
            c.on_epoch_end(trainer, record)

    def on_fit_end(self, trainer):
        for c in self.items:
            c.on_fit_end(trainer)

    def teardown(self, trainer):
        for c in self.items:
            c.teardown(trainer)
