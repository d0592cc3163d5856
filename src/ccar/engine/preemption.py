"""Surviving schedulers: a run that is restarted resumes by itself, and a run that is told to stop saves where it is.

- ``resume``: ``auto`` continues the run in ``out`` when it holds a checkpoint (of the same config: a changed key
  is an error naming it) and starts fresh otherwise; ``false`` never continues (a run folder that holds a run is an
  error). Unset, it is ``auto`` in a process that a scheduler restarted -- ``TORCHELASTIC_RESTART_COUNT`` > 0
  (``torchrun --max-restarts``) or ``SLURM_RESTART_COUNT`` > 0 (a requeued Slurm job) -- and ``false`` otherwise.
  ``--resume`` keeps its strict meaning: the checkpoint must exist.
- SIGTERM (what Slurm and Kubernetes send before killing) and SIGUSR1 (Slurm's ``--signal``): the step in progress
  finishes, a checkpoint with the position in the epoch is written (the epoch's sampler position and random
  states), and the run stops with :class:`Preempted` (``ccar train`` exits with 128 + the signal number: 143 for
  SIGTERM, 138 for SIGUSR1). The next launch resumes at the next step and computes what the uninterrupted run
  would have, to the bit on CPU. Under torchrun every rank stops at the same step (the ranks agree through an
  all-reduce at each check), and only rank 0 writes.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..errors import CCARError, TrainingError
from .checkpoint import FAULT_ENV
from .distributed import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESTART_ENV = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
# Settings that do not change what a run computes: a resumed run may differ in them.
NOT_COMPARED = ("out", "progress", "threads", "workers", "resume", "checkpoint_minutes", "feature_cache")


class Preempted(CCARError):
    """The run stopped on a signal after writing a mid-epoch checkpoint."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; the checkpoint holds the position in the "
                         f"epoch: continue with --resume or resume=auto (the default when torchrun or Slurm "
                         f"restarts the job)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def restarted() -> bool:
    """Whether this process is a scheduler's restart of an earlier attempt."""
    return any(int(os.environ.get(k) or 0) > 0 for k in RESTART_ENV)


def resume_mode(value: Optional[str]) -> str:
    """``auto`` or ``false`` for a config's ``resume`` (None: auto in a restarted process)."""
    if value is None:
        return "auto" if restarted() else "false"
    return value


def config_changes(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between a checkpoint's config and this run's (``NOT_COMPARED`` aside)."""
    keys = []
    for k in sorted(set(saved) | set(current)):
        if not prefix and k in NOT_COMPARED:
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_same_config(saved: Dict, current: Dict, where) -> None:
    changed = config_changes(saved, current)
    if changed:
        shown = ", ".join(f"{k} ({_get(saved, k)!r} -> {_get(current, k)!r})" for k in changed[:4])
        raise TrainingError(f"resume=auto: the run in {where} was started with another config: {shown}"
                            f"{' ...' if len(changed) > 4 else ''}; use the same settings, or another out=DIR")


def _get(d: Dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


# FAULT_ENV="signal:STEP:NAME[:RANK]": this process (rank RANK) sends itself signal NAME after training step STEP
# (counted from the process start), in a first attempt only -- fault injection for the tests.


def _fault(ctx: DistContext) -> Optional[Tuple[int, int]]:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("signal:") or restarted():
        return None
    parts = spec.split(":")
    if len(parts) > 3 and int(parts[3]) != ctx.rank:
        return None
    return int(parts[1]), int(getattr(signal, parts[2]))


class StopSignals:
    """Catches SIGTERM/SIGUSR1 while a run trains (main thread only; elsewhere the signals act as before)."""

    def __init__(self, ctx: DistContext, signals: Iterable[int] = STOP_SIGNALS):
        self.ctx, self.signals, self.received, self.previous = ctx, tuple(signals), 0, {}
        self.fault, self.steps = _fault(ctx), 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def agreed(self, device, timed: bool = False) -> Tuple[int, bool]:
        """(the signal to stop on or 0, whether a timed checkpoint is due), the same on every rank: any rank's
        signal stops them all, and any rank's clock makes them all checkpoint."""
        self.steps += 1
        if self.fault and self.steps == self.fault[0]:
            os.kill(os.getpid(), self.fault[1])  # a real signal, through the handler (or the default action)
        if not self.ctx.enabled:
            return self.received, timed
        flags = torch.zeros(len(STOP_SIGNALS) + 1, dtype=torch.float32, device=device)
        if self.received:
            flags[STOP_SIGNALS.index(self.received) if self.received in STOP_SIGNALS else 0] = 1
        flags[-1] = float(timed)
        self.ctx.all_reduce_sum(flags)
        hit = flags[:-1].nonzero()
        return (int(STOP_SIGNALS[int(hit[0])]) if len(hit) else 0), bool(flags[-1] > 0)


def rng_tensors(loader_generator: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The random states a mid-epoch checkpoint keeps: torch's CPU (and CUDA) generators and the loader's."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if loader_generator is not None:
        out["rng.loader"] = loader_generator
    return out


def restore_rng(tensors: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """Set torch's generators from a mid-epoch checkpoint; returns the loader's state (or None)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    return tensors.get("rng.loader")
