"""Augmentation policies on whole uint8 image batches on the device: RandAugment, AutoAugment (CIFAR-10 policy)
and Cutout, after the crop and flip of the loaders.

``augment.policy=randaugment augment.n=2 augment.m=10`` (Cubuk et al. 2020) and ``augment.policy=autoaugment``
(Cubuk et al. 2019, the CIFAR-10 policy) are kornia's batched implementations (``pip install 'ccar[augment]'``),
with their parameters drawn per image (the operations per batch, below). ``augment.cutout=S`` (DeVries & Taylor
2017) zeroes one S x S square per image, centred uniformly and clipped at the border. One-channel images go through the colour operations as three equal
channels and come back as one, so the policies are grey-safe.

kornia's RandAugment picks its ``n`` operations once per batch (every image of a batch gets the same operations,
each with its own random parameters and application draw); AutoAugment picks one sub-policy per batch likewise.

Random draws come from torch's generator, which is seeded per epoch and saved in mid-epoch checkpoints: a resumed
run augments the same way. They run in the training loop on the batch that arrived, for device-resident and
streamed data alike. Under torchrun every rank draws the parameters of the whole global batch (its generator stays
in step with the others') and applies its own rows of them: 2 processes augment each image as 1 process does.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError

POLICIES = ("none", "randaugment", "autoaugment")


def _kornia_policy(name: str, n: int, m: int):
    try:
        from kornia.augmentation.auto import AutoAugment, RandAugment
    except ImportError:
        raise ConfigError(f"augment.policy={name} needs kornia: pip install 'ccar[augment]'") from None
    return RandAugment(n=n, m=m) if name == "randaugment" else AutoAugment(policy="cifar10")


def cutout(images: torch.Tensor, size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image of a float (B, C, H, W) batch, centred uniformly, clipped.
    Under data parallelism the centres are drawn for the global batch and this rank takes its rows of them.

    >>> _ = torch.manual_seed(0)
    >>> out = cutout(torch.ones(2, 1, 6, 6), 2)
    >>> [int((o == 0).sum()) in (1, 2, 4) for o in out]
    [True, True]
    """
    b, _, h, w = images.shape
    mine = slice(rank, b * world_size, world_size)
    cy = torch.randint(h, (b * world_size, 1, 1), device=images.device)[mine]
    cx = torch.randint(w, (b * world_size, 1, 1), device=images.device)[mine]
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    top, left = cy - size // 2, cx - size // 2
    mask = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(mask[:, None], 0.0)


def _rows_of(params, mine: slice, total: int):
    """kornia's parameters of a batch of ``total`` images (nested ``ParamItem`` lists of dicts of tensors), cut to
    the rows ``mine`` of them."""
    if isinstance(params, list):
        return [_rows_of(p, mine, total) for p in params]
    if isinstance(params, tuple) and hasattr(params, "_replace"):  # kornia's ParamItem(name, data)
        return params._replace(data=_rows_of(params.data, mine, total))
    if isinstance(params, dict):
        out = {}
        for key, value in params.items():
            if key == "forward_input_shape":  # the (B, C, H, W) of the input, not one entry per image
                value = value.clone()
                value[0] = len(range(total)[mine])
            elif torch.is_tensor(value) and value.ndim and value.shape[0] == total:
                value = value[mine]
            out[key] = value
        return out
    return params


class BatchPolicy:
    """``policy(x)``: a uint8 (B, C, H, W) batch augmented by the configured policy and Cutout, as uint8."""

    def __init__(self, name: str = "none", n: int = 2, m: int = 10, cutout_size: int = 0):
        if name not in POLICIES:
            raise ConfigError(f"augment.policy must be one of {', '.join(POLICIES)}, got {name!r}")
        self.name, self.cutout_size = name, cutout_size
        self.policy = _kornia_policy(name, n, m) if name != "none" else None

    @property
    def active(self) -> bool:
        return self.policy is not None or self.cutout_size > 0

    def describe(self) -> str:
        parts = [self.name] if self.policy is not None else []
        return " + ".join(parts + ([f"cutout {self.cutout_size}px"] if self.cutout_size else []))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """``rank`` of ``world_size`` processes: ``images`` are this rank's rows ``rank::world_size`` of the global
        batch (:func:`~ccar.data.sampling.shard`); the draws are the global batch's, so any world size augments each
        image alike."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ConfigError(f"augment.policy and augment.cutout apply to uint8 image batches; this run's batches are "
                              f"{images.dtype} of shape {tuple(images.shape[1:])} (features or a table?)")
        x = images.float().div_(255.0)
        grey = x.shape[1] == 1
        if self.policy is not None:
            x = x.expand(-1, 3, -1, -1) if grey else x
            if world_size > 1:
                b = x.shape[0]
                drawn = self.policy.forward_parameters(torch.Size((b * world_size, *x.shape[1:])))
                x = self.policy(x, params=_rows_of(drawn, slice(rank, b * world_size, world_size), b * world_size))
            else:
                x = self.policy(x)
            x = x.mean(1, keepdim=True) if grey else x
        if self.cutout_size:
            x = cutout(x, self.cutout_size, rank, world_size)
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def batch_policy(augment_cfg) -> Optional[BatchPolicy]:
    """The run's policy (``cfg.augment``), or None when it has none."""
    policy = BatchPolicy(augment_cfg.policy, augment_cfg.n, augment_cfg.m, augment_cfg.cutout)
    return policy if policy.active else None
