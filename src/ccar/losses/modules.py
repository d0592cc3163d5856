"""Thin ``nn.Module`` wrappers: they keep the per-class tables as buffers (moved with ``.to(device)``) and the
DRW schedule; all math lives in :mod:`ccar.losses.functional`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import LossError
from . import functional as LF
from .stats import CountsLike, as_counts, class_balanced_weights


def _f32(table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if table is None else table.float()


class LongTailLoss(nn.Module):
    """A base loss (``ce``, ``focal``, ``cb``, ``cb-focal``, ``ldam``, ``la``, ``bs``, ``vs``) as a module.

    ``drw_epoch``: deferred re-weighting (Cao et al. 2019). From that epoch on, samples are weighted by the
    class-balanced weights with ``drw_beta``. Call :meth:`set_epoch` at the start of every epoch.

    >>> loss_fn = LongTailLoss("la", [500, 50, 5])
    >>> loss_fn(torch.zeros(4, 3), torch.tensor([0, 1, 2, 2])).shape
    torch.Size([])
    """

    def __init__(
        self,
        name: str,
        class_counts: Optional[CountsLike] = None,
        reduction: str = "mean",
        drw_epoch: Optional[int] = None,
        drw_beta: float = 0.9999,
        **options,
    ):
        super().__init__()
        LF._check_reduction(reduction)
        counts = None if class_counts is None else as_counts(class_counts, who=name)  # validated once, reused
        spec = LF.make_base_spec(name, class_counts, **options)
        self.name, self.reduction, self.options = name, reduction, dict(options)
        self.scale, self.gamma = spec.scale, spec.gamma
        # Tables are computed in float64 and kept in float32 (the dtype of the loss math); .double() upgrades them.
        self.register_buffer("class_scale", _f32(spec.class_scale), persistent=False)
        self.register_buffer("shift", _f32(spec.shift), persistent=False)
        self.register_buffer("margins", _f32(spec.margins), persistent=False)
        self.register_buffer("class_weight", _f32(spec.class_weight), persistent=False)
        self.register_buffer("smoothing", _f32(spec.smoothing), persistent=False)
        drw_weight = None
        if drw_epoch is not None:
            if isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0:
                raise LossError(f"{name}: drw_epoch must be a non-negative integer epoch, got {drw_epoch!r}")
            if spec.class_weight is not None:
                raise LossError(f"{name}: already class-balanced; drw_epoch applies to unweighted bases only")
            drw_weight = class_balanced_weights(as_counts(counts, positive=True, who=f"{name} (DRW)"), drw_beta)
        self.drw_epoch = drw_epoch
        self.register_buffer("drw_weight", _f32(drw_weight), persistent=False)
        self.num_classes = None if counts is None else len(counts)
        self.epoch = 0
        self._cache: dict = {}  # per DRW state: the BaseSpec over the current buffers
        # Range-check the targets on every call (one host sync); trainers that validated labels at load time
        # can switch it off.
        self.validate = True

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (0-based) epoch; switches DRW weights on at ``drw_epoch``."""
        self.epoch = int(epoch)

    @property
    def drw_active(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def spec(self) -> LF.BaseSpec:
        """The base loss over this module's buffers; cached per DRW state (small batches feel every microsecond)."""
        active = self.drw_active
        spec = self._cache.get(active)
        if spec is None:
            weight = self.drw_weight if active else self.class_weight
            spec = self._cache[active] = LF.BaseSpec(self.name, self.shift, self.class_scale, self.margins, self.scale,
                                                     weight, self.gamma, self.smoothing)
        return spec

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() / .cuda() replace the buffers: drop what was built on the old ones.
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _check_classes(self, logits: torch.Tensor) -> None:
        if self.num_classes is not None and logits.ndim == 2 and logits.shape[1] != self.num_classes:
            raise LossError(
                f"{self.name}: built for {self.num_classes} classes (len(class_counts)) but logits have "
                f"{logits.shape[1]}"
            )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        return LF.base_loss(logits, targets, self.spec(), self.reduction, check=self.validate)

    def extra_repr(self) -> str:
        parts = [repr(self.name)] + [f"{k}={v}" for k, v in self.options.items()]
        if self.drw_epoch is not None:
            parts.append(f"drw_epoch={self.drw_epoch}")
        return ", ".join(parts + [f"reduction={self.reduction!r}"])


class CCARLoss(LongTailLoss):
    """Class-Confidence Aware Reweighting over any base loss: ``Omega(p_t, f_c) * base_loss``.

    Options: ``omega`` (pivot, 0.75), ``power_base`` (e), ``detach_weight`` (False: gradients flow through
    Omega as in the first author's notebook), ``normalize`` (None or "batch"), ``frequency`` ("sum" = the paper's
    n_y / sum(n); "max" = n_y / max(n), an extension), ``strength`` (exponent on Omega; 0 disables CCAR), plus
    the base's own options and ``drw_epoch``.

    >>> loss_fn = CCARLoss([500, 50, 5], base="la", omega=0.8)
    >>> loss_fn(torch.zeros(4, 3), torch.tensor([0, 1, 2, 2])).item() > 0
    True
    """

    def __init__(
        self,
        class_counts: CountsLike,
        base: str = "ce",
        omega: float = 0.75,
        power_base: float = math.e,
        detach_weight: bool = False,
        normalize: Optional[str] = None,
        frequency: str = "sum",
        strength: float = 1.0,
        reduction: str = "mean",
        drw_epoch: Optional[int] = None,
        drw_beta: float = 0.9999,
        **base_options,
    ):
        LF.check_omega(omega, power_base)
        if normalize not in LF.NORMALIZE:
            raise LossError(f"ccar: normalize must be None or 'batch', got {normalize!r}")
        super().__init__(base, class_counts, reduction, drw_epoch, drw_beta, **base_options)
        tables = LF.ccar_tables(as_counts(class_counts, who="ccar"), frequency, power_base, strength)
        self.register_buffer("log_base", _f32(tables.log_base), persistent=False)
        self.base, self.omega, self.power_base = base, float(omega), float(power_base)
        self.detach_weight, self.normalize, self.frequency, self.strength = bool(detach_weight), normalize, frequency, strength

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        return LF.ccar_from_spec(
            logits, targets, self.spec(), LF.CCARTables(self.log_base), self.omega, self.detach_weight,
            self.normalize, self.reduction, check=self.validate,
        )

    def weight(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Omega per sample for these logits (no gradient); handy for plots and diagnostics."""
        with torch.no_grad():
            z = LF.adjusted_logits(logits, targets, self.spec())
            p_t = torch.softmax(z, 1).gather(1, targets.unsqueeze(1)).squeeze(1)
            log_b = self.log_base[(p_t >= self.omega).long(), targets]
            return torch.exp((self.omega - p_t) * log_b)

    def extra_repr(self) -> str:
        return (
            f"base={self.base!r}, omega={self.omega}, power_base={self.power_base:.4g}, detach_weight={self.detach_weight}, "
            f"normalize={self.normalize!r}, frequency={self.frequency!r}, strength={self.strength}, "
            + super().extra_repr().split(", ", 1)[-1]
        )
