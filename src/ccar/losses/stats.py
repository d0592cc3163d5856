"""Validation of loss inputs and the per-class statistics the long-tail losses are built from."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from ..errors import LossError

CountsLike = Union[Sequence[int], Sequence[float], torch.Tensor]


def as_counts(class_counts: CountsLike, *, positive: bool = False, who: str = "loss") -> torch.Tensor:
    """Return ``class_counts`` as a float64 CPU tensor, checking it is a 1-D, finite, non-negative vector.

    ``positive=True`` is for losses that take a log or a power of the counts (LA, Balanced Softmax, LDAM, CB):
    a class with zero training samples is then an error that names the class.

    >>> as_counts([500, 50, 5]).tolist()
    [500.0, 50.0, 5.0]
    """
    if class_counts is None:
        raise LossError(f"{who}: class_counts is required (the number of training samples of each class)")
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LossError(f"{who}: class_counts must be a sequence of numbers, got {type(class_counts).__name__}") from exc
    if counts.ndim != 1 or counts.numel() < 1:
        raise LossError(f"{who}: class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if not torch.isfinite(counts).all():
        raise LossError(f"{who}: class_counts must be finite, got {counts.tolist()[:10]}")
    bad = (counts < 0).nonzero()
    if bad.numel():
        c = int(bad[0])
        raise LossError(f"{who}: class_counts[{c}] = {counts[c].item():g} is negative")
    if positive:
        zero = (counts <= 0).nonzero()
        if zero.numel():
            c = int(zero[0])
            raise LossError(
                f"{who}: class {c} has 0 training samples; this loss takes a log or a power of the class count. "
                "Drop the empty class or use a loss that does not need counts (ce, focal)"
            )
    if counts.sum() <= 0:
        raise LossError(f"{who}: class_counts sum to 0; at least one class needs training samples")
    return counts


def check_targets(logits: torch.Tensor, targets: torch.Tensor, who: str = "loss", values: bool = True) -> None:
    """Raise :class:`LossError` unless ``logits`` is (N, C) and ``targets`` holds N integer labels in [0, C).

    ``values=False`` skips the range check (a host sync), for callers that check the values themselves.
    """
    if logits.ndim != 2:
        raise LossError(f"{who}: logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise LossError(f"{who}: logits must be floating point, got {logits.dtype}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise LossError(
            f"{who}: targets must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise LossError(f"{who}: targets must be integer class indices, got dtype {targets.dtype}")
    if values and targets.numel():
        num_classes = logits.shape[1]
        if torch.compiler.is_compiling():  # inside a graph: checked on the device, no host sync, no graph break
            torch._assert_async(((targets >= 0) & (targets < num_classes)).all(),
                                f"{who}: a target value is out of range for {num_classes} classes (valid: 0..{num_classes - 1})")
            return
        lo, hi = torch.aminmax(targets)
        lo, hi = int(lo), int(hi)  # one host sync per call; a device-side assert is far worse
        if lo < 0 or hi >= num_classes:
            value = lo if lo < 0 else hi
            raise LossError(f"{who}: target value {value} is out of range for {num_classes} classes (valid: 0..{num_classes - 1})")


def check_num_classes(counts: torch.Tensor, logits: torch.Tensor, who: str = "loss") -> None:
    if counts.numel() != logits.shape[-1]:
        raise LossError(
            f"{who}: class_counts has {counts.numel()} entries but logits have {logits.shape[-1]} classes; "
            "pass one count per class"
        )


def check_omega(omega: float, power_base: float = math.e) -> None:
    if not (isinstance(omega, (int, float)) and 0.0 < float(omega) <= 1.0):
        raise LossError(f"ccar: omega (the confidence pivot) must lie in (0, 1], got {omega!r}")
    if not (isinstance(power_base, (int, float)) and float(power_base) > 1.0 and math.isfinite(power_base)):
        raise LossError(f"ccar: power_base must be a finite number > 1 so that the weight stays positive, got {power_base!r}")


def class_frequency(counts: torch.Tensor, frequency: str = "sum") -> torch.Tensor:
    """f_c: ``"sum"`` gives n_c / sum(n) (the paper); ``"max"`` gives n_c / max(n) (an extension, see README)."""
    if frequency == "sum":
        return counts / counts.sum()
    if frequency == "max":
        return counts / counts.max()
    raise LossError(f"ccar: frequency must be 'sum' (paper) or 'max' (extension), got {frequency!r}")


def class_balanced_weights(counts: torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes.

    >>> class_balanced_weights(torch.tensor([10.0, 10.0]), beta=0.9).tolist()
    [1.0, 1.0]
    """
    if not (0.0 <= float(beta) < 1.0):
        raise LossError(f"cb: beta must lie in [0, 1), got {beta!r}")
    if float(beta) == 0.0:
        weights = torch.ones_like(counts)
    else:
        # 1 - beta^n computed as -expm1(n log beta): exact for beta close to 1 and large n.
        weights = (1.0 - beta) / (-torch.expm1(counts * math.log(beta)))
    return weights * (counts.numel() / weights.sum())


def ldam_margins(counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM margins m_c proportional to n_c^(-1/4), scaled so that the largest margin is ``max_margin``."""
    if not (float(max_margin) >= 0.0):
        raise LossError(f"ldam: max_margin must be >= 0, got {max_margin!r}")
    margins = counts.pow(-0.25)
    return margins * (max_margin / margins.max())
