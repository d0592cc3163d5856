"""The optimisation step: one object per kind of step, owning forward, loss, backward and the optimizer step.

- :class:`PlainStep`: one optimizer step per ``optim.accumulate`` batches (gradients stay local under DDP's
  ``no_sync`` between steps; the epoch's last group is scaled by its own size);
- :class:`SAMStep`: SAM, ASAM and ImbSAM (:mod:`ccar.engine.sam`): the recipes that change how the gradient is
  computed live here, as Lightning puts them into the optimizer's closure, not in callbacks.

A :class:`Batch` carries its own per-sample loss (a mixed batch mixes the losses of its two labels), so mixing and
SAM compose without the step knowing about either. A step reads nothing back from the device: what the loop needs
(the loss, the logits, whether the optimizer stepped) comes back as tensors in a :class:`StepOutput`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError
from .mixing import mixed_losses
from .run import Run
from .sam import SAM, no_sync, sam_backward, tail_classes


@dataclass
class Batch:
    """One training batch after its transforms: inputs ``x``, labels ``y``, its position ``index`` in the epoch,
    and for a mixed batch the partners' labels ``y_mix`` with the weight ``lam`` of ``y`` per sample."""

    x: torch.Tensor
    y: torch.Tensor
    index: int = 0
    y_mix: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None

    def losses(self, loss_fn: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (``loss_fn`` with reduction ``none``): L(z, y), or λ·L(z, y) + (1 − λ)·L(z, y_mix)."""
        if self.y_mix is None:
            return loss_fn(logits, self.y)
        return mixed_losses(loss_fn, logits, self.y, self.y_mix, self.lam)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the batch's mean loss, detached
    logits: torch.Tensor  # detached
    stepped: bool  # whether the optimizer stepped after this batch


class Step:
    """Forward, per-sample loss, backward and optimizer step of one batch. ``net`` is what runs the forward pass
    (the model, wrapped by DDP and/or ``torch.compile``); ``model`` the module it wraps."""

    def __init__(self, run: Run, net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 steps_per_epoch: int):
        self.run, self.net, self.model, self.optimizer = run, net, run.model, optimizer
        self.loss_fn, self.steps = loss_fn, steps_per_epoch
        loss_fn.reduction = "none"  # each sample's loss (ImbSAM splits them by class); the step's loss is their mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.run.autocast():
            return self.net(x)

    def losses(self, batch: Batch) -> torch.Tensor:
        """A fresh forward pass's per-sample losses at the current weights (SAM's second pass)."""
        return batch.losses(self.loss_fn, self.forward(batch.x))

    def __call__(self, batch: Batch) -> StepOutput:
        raise NotImplementedError


class PlainStep(Step):
    """One optimizer step per ``accumulate`` batches; the loss of a group of k batches is divided by k, so that
    accumulating K batches of B computes the gradient of one batch of K·B."""

    def __init__(self, *args, accumulate: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulate = accumulate

    def __call__(self, batch: Batch) -> StepOutput:
        k, i = self.accumulate, batch.index
        group = min(k, self.steps - i // k * k)  # the epoch's last group may be shorter
        stepping = (i + 1) % k == 0 or i + 1 == self.steps
        with contextlib.nullcontext() if stepping else no_sync(self.net):  # gradients stay local between steps
            logits = self.forward(batch.x)
            loss = batch.losses(self.loss_fn, logits).mean()
            if i % k == 0:
                self.optimizer.zero_grad(set_to_none=True)
            (loss / group if group > 1 else loss).backward()
        if stepping:
            self.optimizer.step()
        return StepOutput(loss.detach(), logits.detach(), stepping)


class SAMStep(Step):
    """SAM / ASAM (``tail`` None) or ImbSAM (``tail``: a boolean per class): the gradient is taken at the perturbed
    weights; the passes run under DDP's ``no_sync`` and average their gradients over the ranks themselves."""

    def __init__(self, *args, sam: SAM, tail: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sam, self.tail = sam, tail

    def __call__(self, batch: Batch) -> StepOutput:
        with no_sync(self.net):
            logits = self.forward(batch.x)
            per_sample = batch.losses(self.loss_fn, logits)
            loss = per_sample.mean()
            self.optimizer.zero_grad(set_to_none=True)
            sam_backward(self.sam, self.model, per_sample, batch.y, functools.partial(self.losses, batch),
                         self.run.dist, self.tail)
        self.optimizer.step()
        return StepOutput(loss.detach(), logits.detach(), True)


def tail_mask(counts: Sequence[int], o: OptimConfig, device: torch.device) -> Optional[torch.Tensor]:
    """ImbSAM's tail classes as a boolean per class (None unless ``optim.sam_scope=tail``)."""
    if not o.sam or o.sam_scope != "tail":
        return None
    tail = torch.zeros(len(counts), dtype=torch.bool, device=device)
    tail[tail_classes(counts, o.sam_tail_below)] = True
    if not tail.any():
        raise ConfigError(f"optim.sam_tail_below={o.sam_tail_below} leaves no tail class (the rarest class has "
                          f"{min(counts)} training images)")
    return tail


def wrap_for_training(run: Run) -> nn.Module:
    """What runs the forward pass: the model in DDP under torchrun (not when nothing trains: NCM), compiled with
    ``compile=true``."""
    model, dist = run.model, run.dist
    trains = any(p.requires_grad for p in model.parameters())
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                               else None) if dist.enabled and trains else model)
    return torch.compile(net) if run.cfg.compile else net


def build_step(run: Run, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, steps_per_epoch: int) -> Step:
    """The run's kind of step: :class:`SAMStep` with ``optim.sam``, else :class:`PlainStep`."""
    o, net = run.cfg.optim, wrap_for_training(run)
    if o.sam:
        sam = SAM(run.model.parameters(), o.sam, o.sam_adaptive)
        return SAMStep(run, net, optimizer, loss_fn, steps_per_epoch, sam=sam,
                       tail=tail_mask(run.data.class_counts, o, run.device))
    return PlainStep(run, net, optimizer, loss_fn, steps_per_epoch, accumulate=o.accumulate)


__all__ = ["Batch", "StepOutput", "Step", "PlainStep", "SAMStep", "build_step", "tail_mask", "wrap_for_training"]
