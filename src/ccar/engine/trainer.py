"""The training loop: a :class:`Trainer` over a :class:`TrainState`, readable top to bottom in :meth:`Trainer.fit`.

For each batch: transforms -> step -> step-end callbacks (which may ask, through ``state.control``, for a
checkpoint and a stop); at each epoch's end: validate -> (callbacks) select -> log -> checkpoint. What a step is
lives in :mod:`ccar.engine.step`, what happens around it in :mod:`ccar.engine.callbacks`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ..data.loaders import resume_loader
from . import checkpoint as ckpt
from .callbacks.base import Callbacks, Control
from .finetune import load_trained, set_train_modes
from .preemption import Preempted, restore_rng
from .run import Run, split_size
from .scoring import evaluate_split
from .step import Batch, Step, StepOutput


@dataclass
class TrainState:
    """What a run has done so far; all of it is in the checkpoint (``partial``: a mid-epoch checkpoint's position
    -- epoch, step, the epoch's sums, the random states)."""

    epoch: int = 0  # the epoch in progress (or the next to run)
    step: int = 0  # batches of that epoch done
    history: List[Dict[str, object]] = field(default_factory=list)
    best_val: float = -1.0
    best_state: Optional[Dict[str, torch.Tensor]] = None
    seconds: float = 0.0  # training time of every finished epoch, over all sessions
    partial: Optional[Dict[str, object]] = None
    lr: float = 0.0
    totals: Optional[torch.Tensor] = None  # this epoch's loss sum, correct, seen (on the device; read at its end)
    epoch_started: float = 0.0  # perf_counter() at the epoch's start
    last_save: float = 0.0  # time.monotonic() of the last checkpoint
    control: Control = field(default_factory=Control)

    @classmethod
    def restore(cls, saved, model: torch.nn.Module, optimizer, finetune: str) -> "TrainState":
        """The state of a checkpoint (:func:`ccar.engine.checkpoint.read_checkpoint`), its model and optimizer
        loaded."""
        tensors, meta, opt_meta = saved
        load_trained(model, ckpt.split_prefix(tensors, "model."), finetune, "the checkpoint's weights")
        ckpt.restore_optimizer(optimizer, tensors, opt_meta)
        partial = meta.get("partial")
        if partial is not None:
            partial["rng"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        return cls(epoch=meta["epoch"] + 1, history=meta["history"], best_val=meta["best_val"],
                   best_state=ckpt.split_prefix(tensors, "best.") or None, seconds=meta["seconds"], partial=partial)


class Trainer:
    """Runs ``step`` over ``loader``'s batches (after ``transforms``) from ``state`` to the last epoch."""

    def __init__(self, run: Run, step: Step, loader, transforms: List[Callable[[Batch, int], Batch]],
                 callbacks: Callbacks, state: Optional[TrainState] = None):
        self.run, self.step, self.loader, self.transforms, self.callbacks = run, step, loader, transforms, callbacks
        self.state = state or TrainState()
        self.steps = len(loader)

    def fit(self) -> TrainState:
        state, cb = self.state, self.callbacks
        try:
            cb.on_fit_start(self)
            for state.epoch in range(state.epoch, self.run.cfg.epochs):
                self._start_epoch()
                cb.on_epoch_start(self)
                for batch in self._batches():
                    state.control.reset()
                    cb.on_step_start(self, batch.index)
                    out = self.step(batch)
                    self._count(batch, out)
                    cb.on_step_end(self, batch, out)
                    if state.control.stop:  # the checkpoint is written: every rank leaves together
                        self.run.dist.barrier()
                        raise Preempted(state.control.stop, f"at epoch {state.epoch + 1}, step {state.step}/{self.steps}")
                cb.on_epoch_end(self, self._end_epoch())
                self.run.dist.barrier()
            cb.on_fit_end(self)
        finally:
            cb.teardown(self)
        return state

    def _start_epoch(self) -> None:
        run, state = self.run, self.state
        state.epoch_started = time.perf_counter()
        torch.manual_seed(run.cfg.seed * 1000 + state.epoch)
        self.step.loss_fn.set_epoch(state.epoch)
        for epoch_aware in (self.loader, getattr(self.loader, "sampler", None)):  # DeviceLoader, DataLoader's sampler
            if hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(state.epoch)
                break
        self.step.net.train()
        cfg = run.cfg  # a frozen backbone: fixed features (LAS: BatchNorm statistics shift to the re-sampled data)
        set_train_modes(run.model, "full" if cfg.retrain == "las" else "linear" if cfg.retrain else cfg.finetune)
        state.totals = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss sum, correct, seen
        state.step = 0
        if state.partial is not None:  # resumed mid-epoch: the epoch's sums so far, its random states, its next batch
            if run.dist.is_main:  # (sums over all ranks: rank 0 carries them, the others start from 0)
                state.totals = torch.tensor(state.partial["totals"], dtype=torch.float64, device=run.device)
            state.step = state.partial["step"]
            resume_loader(self.loader, state.step, restore_rng(state.partial["rng"]))
            state.partial = None

    def _batches(self) -> Iterator[Batch]:
        for index, (x, y) in enumerate(self.loader, start=self.state.step):
            batch = Batch(x, y, index)
            for transform in self.transforms:
                batch = transform(batch, self.state.epoch)
            yield batch

    @torch.no_grad()
    def _count(self, batch: Batch, out: StepOutput) -> None:
        totals = self.state.totals
        totals[0] += out.loss.double() * len(batch.y)
        totals[1] += (out.logits.argmax(1) == batch.y).sum()
        totals[2] += len(batch.y)
        self.state.step = batch.index + 1

    def _end_epoch(self, train_seconds: Optional[float] = None) -> Dict[str, object]:
        """The epoch's record, after validation. ``train_seconds``: the epoch's training time when the loop
        measured it itself (a pack: every cell's epoch is the pack's)."""
        run, state = self.run, self.state
        run.dist.all_reduce_sum(state.totals)
        if train_seconds is None:
            train_seconds = time.perf_counter() - state.epoch_started - self.step.take_overhead()  # (graph capture)
        if split_size(run.data.val):
            val = evaluate_split(run, run.data.val, shifts=False)
        else:  # val_fraction=0: no model selection, the last epoch is reported as "best" too
            val = {"top1": None, "balanced": None}
        state.seconds += time.perf_counter() - state.epoch_started
        loss_sum, correct, seen = state.totals.tolist()
        record = {"epoch": state.epoch + 1, "loss": loss_sum / seen, "train_top1": 100 * correct / seen,
                  "lr": state.lr, "val_top1": val["top1"], "val_balanced": val["balanced"],
                  "images_per_s": seen / train_seconds, "seconds": state.seconds}
        state.history.append(record)
        return record
