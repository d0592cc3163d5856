"""Batch transforms: what happens to a training batch between the loader and the step, in this order.

1. :class:`ToDevice` — the batch onto the run's device;
2. :class:`TwoViews` — contrastive losses: a second view of each image (another random crop and flip of it);
3. :class:`Policy` — RandAugment / AutoAugment / Cutout on the uint8 images (``augment.policy``, ``augment.cutout``),
   each view drawn apart;
4. :class:`Normalize` — the run's ``prepare``: to float, normalised, channels-last;
5. :class:`Mix` — mixup, CutMix or Remix (``mix``), which also sets the batch's second labels and label weights.

Each is called as ``batch = transform(batch, epoch)``, like timm's ``Mixup``: a batch transform, not a branch in the
loop. The random ones draw from torch's generator, which the loop seeds per epoch and mid-epoch checkpoints save.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List

import torch

from ..data.loaders import random_crop_flip
from ..data.policies import BatchPolicy, batch_policy
from ..errors import ConfigError
from .features import uses_cache
from .mixing import mix_batch
from .run import Run
from .step import Batch


class ToDevice:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        return dataclasses.replace(batch, x=batch.x.to(self.device, non_blocking=True),
                                   y=batch.y.to(self.device, non_blocking=True))


class TwoViews:
    """Contrastive losses see two augmented views of each image: the loader's (its crop and flip) and another
    random crop (``padding`` pixels) and flip of it, drawn from torch's generator for the global batch (under
    torchrun each rank takes its rows, so 2 processes draw what 1 does). x becomes (2B, ...), view-major."""

    def __init__(self, padding: int, flip: bool, rank: int, world_size: int):
        self.padding, self.flip, self.rank, self.world_size = padding, flip, rank, world_size

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        second = random_crop_flip(batch.x, self.padding, self.flip, torch.default_generator, self.rank,
                                  self.world_size)
        return dataclasses.replace(batch, x=torch.cat([batch.x, second]), views=2)


class Policy:
    """A batched augmentation policy; under torchrun it draws for the global batch and applies this rank's rows.
    Each view of a several-view batch is drawn apart (as one process draws for each)."""

    def __init__(self, policy: BatchPolicy, rank: int, world_size: int):
        self.policy, self.rank, self.world_size = policy, rank, world_size

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        views = batch.x.chunk(batch.views)
        return dataclasses.replace(batch, x=torch.cat([self.policy(v, self.rank, self.world_size) for v in views]))

    def describe(self) -> str:
        return self.policy.describe()


class Normalize:
    def __init__(self, prepare: Callable[[torch.Tensor], torch.Tensor]):
        self.prepare = prepare

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        return dataclasses.replace(batch, x=self.prepare(batch.x))


class Mix:
    """mixup / CutMix / Remix of each batch (:mod:`ccar.engine.mixing`), in epochs before ``mix_until``."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.mode, self.alpha, self.prob, self.until = cfg.mix, cfg.mix_alpha, cfg.mix_prob, cfg.mix_until
        self.kappa, self.tau = cfg.remix_kappa, cfg.remix_tau
        self.counts = torch.tensor(run.data.class_counts, dtype=torch.float32, device=run.device)  # Remix's ratios

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        if self.until is not None and epoch >= self.until:
            return batch
        x, y_mix, lam = mix_batch(batch.x, batch.y, self.mode, self.alpha, self.counts, self.prob, self.kappa, self.tau)
        return dataclasses.replace(batch, x=x, y_mix=y_mix, lam=lam)


def build_transforms(run: Run) -> List[Callable[[Batch, int], Batch]]:
    """The run's batch transforms, in their fixed order (the policy before normalising: it works on uint8)."""
    cfg = run.cfg
    transforms: list = [ToDevice(run.device)]
    if cfg.loss.family == "contrastive":
        augment = run.data.augment  # (a crop of at least 2 pixels: two equal views teach the contrast nothing)
        transforms.append(TwoViews(max(augment.crop_padding, 2), augment.flip, run.dist.rank, run.dist.world_size))
    policy = batch_policy(cfg.augment)
    if policy is not None:
        if len(run.data.input_shape) != 3:
            raise ConfigError(f"augment.policy and augment.cutout apply to images; this run trains on vectors of "
                              f"{run.data.input_shape[0]} values" + (
                                  " (cached from the frozen backbone: cache_features=false augments the images)"
                                  if uses_cache(cfg) else ""))
        transforms.append(Policy(policy, run.dist.rank, run.dist.world_size))
    transforms.append(Normalize(run.prepare))
    if cfg.mix != "none":
        transforms.append(Mix(run))
    return transforms
