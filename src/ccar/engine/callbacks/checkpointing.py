"""Model selection and checkpoints as callbacks: the best model on the validation split, the per-epoch checkpoint,
and the mid-epoch one the loop's control asks for (a stop signal, ``checkpoint_minutes``)."""

from __future__ import annotations

import time

from ...config import to_dict
from ...data.loaders import loader_state
from .. import checkpoint as ckpt
from ..finetune import saved_state
from ..preemption import rng_tensors
from .base import Callback


class BestOnValidation(Callback):
    """Model selection on the validation split only: balanced (class-averaged) accuracy, which estimates the
    balanced test top-1 even though validation is long-tailed like training."""

    def on_epoch_end(self, trainer, record) -> None:
        state = trainer.state
        if record["val_balanced"] is not None and record["val_balanced"] > state.best_val:
            state.best_val = record["val_balanced"]
            state.best_state = saved_state(trainer.run.model, trainer.run.cfg.finetune, clone=True)


class Checkpointing(Callback):
    """``checkpoint.safetensors`` every ``checkpoint_every`` epochs and at the last; mid-epoch when the loop's
    control asks (with the epoch's sums over all ranks and the random states, so a resumed epoch continues exactly).
    Rank 0 writes."""

    def on_fit_start(self, trainer) -> None:
        trainer.state.last_save = time.monotonic()

    def on_step_end(self, trainer, batch, out) -> None:
        state, run = trainer.state, trainer.run
        if not state.control.save:
            return
        so_far = run.dist.all_reduce_sum(state.totals.clone())  # the epoch's sums over all ranks
        if run.dist.is_main:
            part = {"epoch": state.epoch, "step": batch.index + 1, "totals": so_far.tolist()}
            self._save(trainer, state.epoch - 1, state.seconds + time.perf_counter() - state.epoch_started,
                       partial=part, extra=rng_tensors(loader_state(trainer.loader)))
        state.last_save = time.monotonic()

    def on_epoch_end(self, trainer, record) -> None:
        cfg, state = trainer.run.cfg, trainer.state
        if trainer.run.dist.is_main and ((state.epoch + 1) % cfg.checkpoint_every == 0 or state.epoch + 1 == cfg.epochs):
            self._save(trainer, state.epoch, state.seconds)
        state.last_save = time.monotonic()  # (checkpoint_minutes counts from the last checkpoint, mid-epoch or not)

    @staticmethod
    def _save(trainer, epoch: int, seconds: float, partial=None, extra=None) -> None:
        run, state = trainer.run, trainer.state
        meta = {"epoch": epoch, "history": state.history, "best_val": state.best_val, "seconds": seconds,
                "config": to_dict(run.cfg), **({"partial": partial} if partial is not None else {})}
        ckpt.save_checkpoint(run.run_dir / "checkpoint.safetensors", saved_state(run.model, run.cfg.finetune),
                             trainer.step.optimizer, state.best_state, meta, extra)
