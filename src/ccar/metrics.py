"""Evaluation metrics for long-tailed classification (method.md section 4), as pure functions of logits.

A lower layer than the engine and the reports, which both use it (as torchmetrics is to Lightning)."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

MANY, FEW = 100, 20  # many-shot: > 100 training images; few-shot: < 20; medium in between


def _mean_or_none(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (%) with ``n_bins`` equal-width confidence bins: sum_b |B|/N * |accuracy(B) - confidence(B)|.

    >>> round(expected_calibration_error(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1])), 4)
    35.0
    """
    conf, pred = probs.max(1)
    correct = (pred == targets).double()
    conf = conf.double()
    bins = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.double().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return round(100.0 * ece, 6)


def shot_groups(class_counts: Sequence[int]) -> Dict[str, List[int]]:
    """Classes by training count: ``many`` (> 100), ``medium`` (20-100), ``few`` (< 20)."""
    counts = list(class_counts)
    return {
        "many": [c for c, n in enumerate(counts) if n > MANY],
        "medium": [c for c, n in enumerate(counts) if FEW <= n <= MANY],
        "few": [c for c, n in enumerate(counts) if n < FEW],
    }


def rank_thirds(class_counts: Sequence[int]) -> Dict[str, List[int]]:
    """Head / middle / tail thirds by class rank (most frequent first); for sets where shot groups degenerate."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    parts = np.array_split(np.asarray(order, dtype=np.int64), 3)
    return {name: sorted(p.tolist()) for name, p in zip(("head", "middle", "tail"), parts)}


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int], n_bins: int = 15
) -> Dict[str, object]:
    """Top-1, balanced accuracy, per-class accuracy, shot groups, rank thirds and ECE (accuracies in %).

    Groups average the per-class accuracies of their classes; a group with no class is ``None``.

    >>> m = classification_metrics(torch.tensor([[2.0, 0], [0, 1], [3, 0]]), torch.tensor([0, 1, 1]), [500, 10])
    >>> round(m["top1"], 2), m["per_class"], m["many"], m["few"], m["medium"]
    (66.67, [100.0, 50.0], 100.0, 50.0, None)
    """
    logits = logits.float()
    targets = targets.long()
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    correct = (pred == targets).double()
    # One pass for all classes (iNaturalist has 8,142): hits and sample counts per class.
    hits = torch.bincount(targets, weights=correct, minlength=num_classes).tolist()
    seen = torch.bincount(targets, minlength=num_classes).tolist()
    per_class: List[Optional[float]] = [100.0 * (h / n) if n else None for h, n in zip(hits, seen)][:num_classes]

    def group_mean(classes: Iterable[int]) -> Optional[float]:
        return _mean_or_none([per_class[c] for c in classes if per_class[c] is not None])

    shots = shot_groups(class_counts)
    thirds = rank_thirds(class_counts)
    present = [a for a in per_class if a is not None]
    return {
        "top1": 100.0 * correct.mean().item() if len(targets) else None,
        "balanced": _mean_or_none(present),
        "per_class": per_class,
        "many": group_mean(shots["many"]),
        "medium": group_mean(shots["medium"]),
        "few": group_mean(shots["few"]),
        "groups": {name: group_mean(cls) for name, cls in thirds.items()},
        "ece": expected_calibration_error(torch.softmax(logits, 1), targets, n_bins) if len(targets) else None,
        "n": int(len(targets)),
    }
