"""A run once assembled: what every phase after assembly works on (training, evaluation, the feature cache,
``ccar eval`` and ``ccar predict``), passed as one object instead of eight arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import TrainConfig
from ..data import LongTailData
from .distributed import DistContext
from .runtime import Precision


@dataclass
class Run:
    """``cfg`` resolved (``model.name=auto`` named), ``data`` (after the feature cache: features), ``model`` (the
    module the run trains and saves, never a DDP wrapper), where and in which precision it computes, ``dist`` (the
    process group), ``eval_batches(split)`` (an evaluation loader of this rank's shard), and ``prepare(x)`` (a raw
    batch on the device to model input: normalisation, channels-last)."""

    cfg: TrainConfig
    data: LongTailData
    model: nn.Module
    device: torch.device
    precision: Precision
    dist: DistContext
    eval_batches: Callable[[object], Iterable]
    prepare: Callable[[torch.Tensor], torch.Tensor]
    log: Callable[..., None] = field(default=print, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    def autocast(self):
        return self.precision.autocast(self.device)


def split_size(split) -> int:
    """Samples in a split: a (inputs, targets) pair of tensors, or a file list."""
    return len(split[1]) if isinstance(split, tuple) else len(split)
