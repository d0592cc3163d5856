"""Several runs trained as one program: ``ccar sweep``'s packs (``pack: auto | N | off``).

A pack is K ordinary runs -- each prepared by :func:`ccar.engine.train.prepare` into its own run folder, with its
own data loader, sampler, seed, loss, learning rate and schedule, validation, best-epoch selection, checkpoints and
callbacks -- whose models are one :class:`~ccar.engine.packed.PackedModels`. Each cell's model and optimizer state
are *views* into the stacked tensors, so whatever a cell's callbacks read or write (validation, the best model,
a checkpoint, MaxNorm) is that cell's slice of the pack, as it trains, without copies. :class:`PackedTrainer` runs
the cells in lock-step: each batch, every cell draws its own batch (under its own random state, so it draws what
it would alone), the packed step computes all K, and each cell's callbacks see its own :class:`StepOutput`.

A packed cell's folder is an unpacked one's: the same files, its own checkpoint, resumable alone or in a pack.
On the CPU packing does not pay (one vmapped program is slower than the K runs one after the other: measured in
``benchmarks/gpu_recipe.py``), so ``pack: auto`` packs on CUDA only.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..config import TrainConfig, to_dict
from ..data.loaders import DeviceLoader
from ..errors import CCARError
from ..tuning import flatten
from .finish import finish
from .packed import CapturedPackedStep, PackedModels, PackedStep, StackedSGD
from .preemption import Preempted
from .step import StepOutput, capture_blocker
from .trainer import Trainer

# Keys a pack's cells may differ in: each cell's own loop, loss, sampling and optimizer settings. Everything else
# (the architecture, the data's shape, batch size, epochs, precision, ...) must be the same for cells to pack.
CELL_OWN = ("out", "seed", "loss", "sampler", "sampler_epoch", "optim.lr", "optim.momentum", "optim.weight_decay",
            "optim.warmup_epochs", "optim.schedule", "optim.milestones", "optim.decay", "optim.max_norm", "augment",
            "mix", "mix_alpha", "mix_prob", "mix_until", "remix_kappa", "remix_tau", "imbalance", "posthoc_tau",
            "tau_norm", "resume", "progress", "checkpoint_every", "checkpoint_minutes", "feature_cache")


class PackError(CCARError):
    """These runs cannot train as one pack (the reason says why); they train one by one instead."""


def pack_blocker(cfg: TrainConfig) -> Optional[str]:
    """Why a run cannot be a cell of a pack (None: it can): one process, plain SGD steps of the whole model."""
    o = cfg.optim
    reasons = [(o.name != "sgd", f"optim.name={o.name} (packs update with SGD)"),
               (bool(o.sam), "optim.sam (SAM's two passes)"), (o.accumulate > 1, "optim.accumulate > 1"),
               (o.backbone_lr is not None, "optim.backbone_lr"), (cfg.finetune != "full", f"finetune={cfg.finetune}"),
               (cfg.retrain is not None, f"a second stage (retrain={cfg.retrain})"),
               (not cfg.resident, "resident=false (packs keep their data on the device)"),
               (cfg.loss.family is not None, f"loss {cfg.loss.method} (its model returns several outputs)")]
    return next((why for blocked, why in reasons if blocked), None)


def pack_capture_blocker(run) -> Optional[str]:
    """Why a pack's step is not one CUDA graph (None: it is): ``compile`` auto or graph, on a GPU, and what
    :func:`~ccar.engine.step.capture_blocker` checks for one run (the first cell's: the cells share those keys)."""
    if run.cfg.compile not in ("auto", "graph"):
        return f"compile={run.cfg.compile}"
    return capture_blocker(run)


def pack_key(cfg: TrainConfig) -> str:
    """What runs must share to train as one pack: the config without :data:`CELL_OWN`."""
    flat = flatten("", to_dict(cfg))
    return repr(sorted((k, repr(v)) for k, v in flat.items()
                       if not any(k == own or k.startswith(own + ".") for own in CELL_OWN)))


class PackedTrainer:
    """K prepared :class:`Trainer` s fitted in lock-step through one :class:`PackedStep`. The first cell's
    :class:`~ccar.engine.callbacks.StopOnSignal` watches the signals and the checkpoint clock; its control is
    every cell's, so a stop leaves every cell's checkpoint at the same step."""

    def __init__(self, trainers: Sequence[Trainer]):
        self.trainers = list(trainers)
        _check_lockstep(self.trainers)
        models = [t.run.model for t in self.trainers]
        self.packed = PackedModels(models)
        cfgs = [t.run.cfg.optim for t in self.trainers]
        optimizer = StackedSGD(self.packed.params, [o.lr for o in cfgs], [o.momentum for o in cfgs],
                               [o.weight_decay for o in cfgs], nesterov=cfgs[0].nesterov)
        for k, t in enumerate(self.trainers):
            self.packed.bind(k, t.run.model)
            optimizer.bind(k, t.step.optimizer, self.packed.param_names, t.run.model)
        first, losses = self.trainers[0].run, [t.step.loss_fn for t in self.trainers]
        self.why = pack_capture_blocker(first)
        if self.why is None:  # (autocast's cast cache is not captured)
            autocast = functools.partial(first.precision.autocast, first.device, cache=False)
            self.step = CapturedPackedStep(self.packed, losses, optimizer, autocast)
        else:
            self.step = PackedStep(self.packed, losses, optimizer, first.autocast)
        self.rng: List[Optional[torch.Tensor]] = [None] * len(self.trainers)

    def fit(self) -> None:
        ts, first = self.trainers, self.trainers[0]
        try:
            self._each("on_fit_start")
            for epoch in range(first.state.epoch, first.run.cfg.epochs):
                self._each_start_epoch(epoch)
                started = time.perf_counter()
                for batches in self._batches():
                    self._each("on_step_start", batches)
                    self.step.optimizer.set_lr([t.state.lr for t in ts])
                    losses, logits = self.step.run(batches)
                    self._each_step_end(batches, losses, logits)
                    if first.state.control.stop:  # every cell's checkpoint is written
                        raise Preempted(first.state.control.stop, f"at epoch {epoch + 1}, step {first.state.step}/"
                                                                  f"{first.steps} (a pack of {len(ts)})")
                seconds = time.perf_counter() - started - getattr(self.step, "take_overhead", float)()
                for k, t in enumerate(ts):
                    with self._own_rng(k):
                        t.state.epoch_started = time.perf_counter() - seconds  # (its own validation after)
                        t.callbacks.on_epoch_end(t, t._end_epoch(train_seconds=seconds))
            self._each("on_fit_end")
        finally:
            for t in ts:
                t.callbacks.teardown(t)

    @contextlib.contextmanager
    def _own_rng(self, k: int):
        """Torch's generators as cell ``k`` left them: its epoch seed, its augmentation draws, its checkpoint's
        random state are what it would have alone."""
        cuda = self.trainers[k].run.device.type == "cuda"
        if self.rng[k] is not None:
            torch.set_rng_state(self.rng[k][0])
            if cuda:
                torch.cuda.set_rng_state(self.rng[k][1])
        try:
            yield
        finally:
            self.rng[k] = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)

    def _each(self, hook: str, batches=None) -> None:
        for k, t in enumerate(self.trainers):
            with self._own_rng(k):
                if batches is None:
                    getattr(t.callbacks, hook)(t)
                else:
                    t.state.control.reset()
                    getattr(t.callbacks, hook)(t, batches[k].index)

    def _each_start_epoch(self, epoch: int) -> None:
        for k, t in enumerate(self.trainers):
            with self._own_rng(k):
                t.state.epoch = epoch
                t._start_epoch()
                t.callbacks.on_epoch_start(t)
        self.packed.train()

    def _batches(self):
        streams = [t._batches() for t in self.trainers]
        while True:
            batches = []
            for k, stream in enumerate(streams):
                with self._own_rng(k):
                    batch = next(stream, None)
                if batch is None:
                    return
                batches.append(batch)
            yield batches

    def _each_step_end(self, batches, losses: torch.Tensor, logits: torch.Tensor) -> None:
        control = self.trainers[0].state.control
        for k, t in enumerate(self.trainers):
            out = StepOutput(losses[k], logits[k], True)
            with self._own_rng(k):
                t._count(batches[k], out)
                if k:  # the first cell's StopOnSignal decided for the pack (its callbacks ran first)
                    t.state.control.save, t.state.control.stop = control.save, control.stop
                t.callbacks.on_step_end(t, batches[k], out)


def _check_lockstep(trainers: Sequence[Trainer]) -> None:
    """The cells can step together: data on the device, as many batches per epoch, at the same point."""
    for t in trainers:
        if not isinstance(t.loader, DeviceLoader):
            raise PackError(f"{t.run.run_dir}: its data streams from files (packs keep their data on the device)")
    steps = {len(t.loader) for t in trainers}
    where = {(t.state.epoch, (t.state.partial or {}).get("step", 0)) for t in trainers}
    if len(steps) > 1:
        raise PackError(f"the cells have different numbers of batches per epoch ({sorted(steps)})")
    if len(where) > 1:
        raise PackError(f"the cells' checkpoints are at different points ({sorted(where)})")


def train_pack(cfgs: Sequence[TrainConfig], resumes: Sequence[bool], log=print) -> List[Dict[str, object]]:
    """Train ``cfgs`` as one pack; each cell's metrics as :func:`ccar.engine.train.train` returns them. Cells that
    cannot pack (:class:`PackError`) train one by one instead, and the log says why."""
    from .train import prepare, train  # (train imports the engine; this module is imported by the sweep)

    trainers = [prepare(cfg, resume, log, signals=k == 0) for k, (cfg, resume) in enumerate(zip(cfgs, resumes))]
    try:
        packed = PackedTrainer(trainers)
    except (PackError, ValueError) as exc:
        log(f"pack of {len(cfgs)}: trained one by one ({exc})")
        return [train(cfg, resume=resume or (cfg.run_dir() / "checkpoint.safetensors").exists(), log=log)
                for cfg, resume in zip(cfgs, resumes)]
    how = "one CUDA graph" if packed.why is None else f"eager ({packed.why})"
    log(f"pack of {len(cfgs)} cells ({', '.join(str(c.run_dir()) for c in cfgs)}): one vmapped program, step {how}")
    packed.fit()
    return [finish(t.run, t.state.best_state, t.state.history) for t in trainers]
