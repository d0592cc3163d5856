"""The optimisation step: one object per kind of step, owning forward, loss, backward and the optimizer step.

- :class:`PlainStep`: one optimizer step per ``optim.accumulate`` batches (gradients stay local under DDP's
  ``no_sync`` between steps; the epoch's last group is scaled by its own size);
- :class:`SAMStep`: SAM, ASAM and ImbSAM (:mod:`ccar.engine.sam`): the recipes that change how the gradient is
  computed live here, as Lightning puts them into the optimizer's closure, not in callbacks;
- :class:`CapturedStep`: the plain step as one CUDA graph on a GPU -- of the ``torch.compile``'d model with
  ``compile=auto``, of the eager kernels with ``compile=graph``: forward, every loss, backward and the optimizer
  step replayed as a single launch, where a ResNet-32 step is otherwise a few hundred tiny kernel launches.
  :func:`capture_blocker` says why a run cannot be captured.

A :class:`Batch` carries its own per-sample loss (a mixed batch mixes the losses of its two labels), so mixing and
SAM compose without the step knowing about either. A step reads nothing back from the device: what the loop needs
(the loss, the logits, whether the optimizer stepped) comes back as tensors in a :class:`StepOutput`.
"""

from __future__ import annotations

import contextlib
import functools
import time
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
    views: int = 1  # augmented views of each image in x, stacked view-major (contrastive losses: 2)

    def losses(self, loss_fn: nn.Module, logits) -> torch.Tensor:
        """Per-sample losses (``loss_fn`` with reduction ``none``): L(z, y), or λ·L(z, y) + (1 − λ)·L(z, y_mix).
        ``logits``: the model's output (a dict of tensors for the multi-expert and contrastive families)."""
        if self.y_mix is None:
            return loss_fn(logits, self.y)
        return mixed_losses(loss_fn, logits, self.y, self.y_mix, self.lam)


def counted_logits(out, batch: Batch) -> torch.Tensor:
    """The logits the loop counts accuracy by: the model's output, its ``"logits"`` for a dict (a multi-expert
    model's ensemble), the first view's rows for a batch of several views."""
    logits = out["logits"] if isinstance(out, dict) else out
    return logits[: len(batch.y)] if batch.views > 1 else logits


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

    overhead_seconds = 0.0  # set-up inside the epoch that is not training (CUDA graph capture)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """The model's output; a model that queues its keys (PaCo) also reads the labels."""
        with self.run.autocast():
            return self.net(x, targets=y) if y is not None and self.takes_targets else self.net(x)

    @property
    def takes_targets(self) -> bool:
        return getattr(self.model, "key_encoder", None) is not None

    def take_overhead(self) -> float:
        """Seconds of set-up since the last call (kept out of the epoch's images/s)."""
        seconds, self.overhead_seconds = self.overhead_seconds, 0.0
        return seconds

    def losses(self, batch: Batch) -> torch.Tensor:
        """A fresh forward pass's per-sample losses at the current weights (SAM's second pass)."""
        return batch.losses(self.loss_fn, self.forward(batch.x, batch.y))

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
            out = self.forward(batch.x, batch.y)
            loss = batch.losses(self.loss_fn, out).mean()
            if i % k == 0:
                self.optimizer.zero_grad(set_to_none=True)
            (loss / group if group > 1 else loss).backward()
        if stepping:
            self.optimizer.step()
        return StepOutput(loss.detach(), counted_logits(out, batch).detach(), stepping)


class SAMStep(Step):
    """SAM / ASAM (``tail`` None) or ImbSAM (``tail``: a boolean per class): the gradient is taken at the perturbed
    weights; the passes run under DDP's ``no_sync`` and average their gradients over the ranks themselves."""

    def __init__(self, *args, sam: SAM, tail: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sam, self.tail = sam, tail

    def __call__(self, batch: Batch) -> StepOutput:
        with no_sync(self.net):
            out = self.forward(batch.x, batch.y)
            per_sample = batch.losses(self.loss_fn, out)
            loss = per_sample.mean()
            self.optimizer.zero_grad(set_to_none=True)
            sam_backward(self.sam, self.model, per_sample, batch.y, functools.partial(self.losses, batch),
                         self.run.dist, self.tail)
        self.optimizer.step()
        return StepOutput(loss.detach(), counted_logits(out, batch).detach(), True)


class CapturedStep(PlainStep):
    """:class:`PlainStep` (one batch per optimizer step) as a CUDA graph. Every full batch replays the graph: its
    inputs are copied into the graph's static buffers, and the loss and logits come back in the graph's static
    outputs. The first ``warmup`` full batches run eagerly on a side stream (cuDNN autotuning, workspaces: real
    training steps), the next is captured, then replayed; the epoch's last partial batch runs eagerly on the same
    weights and optimizer state, so no sample is dropped. A loss that changes during training (DRW at its epoch) is
    captured again. Needs an optimizer whose learning rate is a device tensor (:func:`ccar.engine.train.
    build_optimizer` with ``graph_safe``)."""

    def __init__(self, *args, warmup: int = 3, **kwargs):
        super().__init__(*args, accumulate=1, **kwargs)
        self.warmup, self.warm, self.graph, self.key = warmup, 0, None, None

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        with self.run.precision.autocast(self.run.device, cache=False):
            return self.net(x)

    def __call__(self, batch: Batch) -> StepOutput:
        key = getattr(self.loss_fn, "drw_active", None)  # what the loss computes now (baked into a graph)
        if self.graph is not None and (key != self.key or batch.x.shape != self.static_x.shape):
            if batch.x.shape == self.static_x.shape:  # the loss changed: capture again
                self.graph = None
            else:  # the epoch's last, partial batch
                return super().__call__(batch)
        if self.graph is None:
            if self.warm < self.warmup:
                self.warm += 1
                return self._on_side_stream(batch)
            self._capture(batch, key)
        self.static_x.copy_(batch.x)
        self.static_y.copy_(batch.y)
        self.graph.replay()
        return StepOutput(self.static_loss, self.static_logits, True)

    def _on_side_stream(self, batch: Batch) -> StepOutput:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = PlainStep.__call__(self, batch)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, batch: Batch, key) -> None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        self.static_x, self.static_y, self.key = batch.x.clone(), batch.y.clone(), key
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it overwrites
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            logits = self.forward(self.static_x)
            loss = self.loss_fn(logits, self.static_y).mean()
            loss.backward()
            self.optimizer.step()
        self.static_loss, self.static_logits = loss.detach(), logits.detach()
        torch.cuda.synchronize()
        self.overhead_seconds += time.perf_counter() - started


def capture_blocker(run: Run) -> Optional[str]:
    """Why the run's step cannot be one CUDA graph (None: it can): the step must be a plain one, on one CUDA device,
    over batches of a fixed shape that live on the device, and free of host synchronisation."""
    cfg = run.cfg
    reasons = [  # (checked in this order: the first that holds is the reason)
        (lambda: run.device.type != "cuda", f"CUDA graphs need a GPU (device {run.device.type})"),
        (lambda: cfg.compile == "true", "compile=true asks for torch.compile instead"),
        (lambda: run.dist.enabled, "torchrun: DDP's gradient buckets are not captured"),
        (lambda: bool(cfg.optim.sam), "optim.sam: SAM's two passes are not captured"),
        (lambda: cfg.optim.accumulate > 1, "optim.accumulate > 1"),
        (lambda: cfg.mix != "none", f"mix={cfg.mix}: the mixing draws on the host each batch"),
        (lambda: not (run.data.in_memory and cfg.resident), "the data streams from host memory (resident=false or "
                                                            "files)"),
        (lambda: not any(p.requires_grad for p in run.model.parameters()), "nothing trains"),
        (lambda: cfg.loss.family is not None, f"loss {cfg.loss.method}: its model returns several outputs"),
    ]
    return next((why for blocked, why in reasons if blocked()), None)


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


def wrap_for_training(run: Run, compiled: bool = False) -> nn.Module:
    """What runs the forward pass: the model in DDP under torchrun (not when nothing trains: NCM), through
    ``torch.compile`` when ``compiled``."""
    model, dist = run.model, run.dist
    trains = any(p.requires_grad for p in model.parameters())
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                               else None) if dist.enabled and trains else model)
    return torch.compile(net) if compiled else net


def build_step(run: Run, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, steps_per_epoch: int) -> Step:
    """The run's kind of step: :class:`SAMStep` with ``optim.sam``, :class:`CapturedStep` where the run can be
    captured and ``compile`` is auto or graph, else :class:`PlainStep`."""
    o, graph = run.cfg.optim, uses_graph(run)
    # compile=auto captures the torch.compile'd model (the combination measured on an H200, docs/benchmarks.md);
    # compile=graph the eager kernels; compile=true compiles without capturing
    net = wrap_for_training(run, compiled=run.cfg.compile == "true" or (graph and run.cfg.compile == "auto"))
    if graph:
        return CapturedStep(run, net, optimizer, loss_fn, steps_per_epoch)
    if o.sam:
        sam = SAM(run.model.parameters(), o.sam, o.sam_adaptive)
        return SAMStep(run, net, optimizer, loss_fn, steps_per_epoch, sam=sam,
                       tail=tail_mask(run.data.class_counts, o, run.device))
    return PlainStep(run, net, optimizer, loss_fn, steps_per_epoch, accumulate=o.accumulate)


def uses_graph(run: Run) -> bool:
    """Whether the run's step is a CUDA graph: ``compile=auto`` where :func:`capture_blocker` finds nothing in the
    way; ``compile=graph`` the same, or an error saying why not."""
    if run.cfg.compile not in ("auto", "graph"):
        return False
    why = capture_blocker(run)
    if why is not None and run.cfg.compile == "graph":
        raise ConfigError(f"compile=graph: this run's step cannot be a CUDA graph: {why}; use compile=auto (eager "
                          f"where it cannot) or compile=false")
    return why is None


def step_summary(run: Run) -> str:
    """One line on how the step runs, for the run's summary ('' for the plain default on the CPU)."""
    if run.cfg.compile == "true":
        return "step: torch.compile (compile=true)"
    if run.cfg.compile == "false":
        return "step: eager (compile=false)" if run.device.type == "cuda" else ""
    why = capture_blocker(run)
    if why is None:
        how = "the torch.compile'd model" if run.cfg.compile == "auto" else "eager kernels"
        return (f"step: one CUDA graph of {how} (compile={run.cfg.compile}): forward, loss, backward and optimizer "
                f"step replayed as one launch")
    return f"step: eager ({why})" if run.device.type == "cuda" else ""


__all__ = ["Batch", "StepOutput", "Step", "PlainStep", "SAMStep", "CapturedStep", "build_step", "capture_blocker",
           "step_summary", "tail_mask", "uses_graph", "wrap_for_training"]
