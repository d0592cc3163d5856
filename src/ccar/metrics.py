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


AGNOSTIC_FACTORS = (50, 25, 10, 5, 2)  # SADE's test distributions: forward and backward long tails, and uniform
MAX_CONFUSION_CLASSES = 100  # the full confusion matrix is kept (metrics.json, the figure) up to this many classes


def shifted_prior(class_counts: Sequence[int], factor: float, direction: str = "forward") -> torch.Tensor:
    """A long-tailed test label distribution (Zhang et al. 2022, SADE): q_c ∝ factor^(-r_c / (C - 1)), r_c the
    class's rank by training count (0 = most frequent). ``forward`` has the training set's head as its head;
    ``backward`` reverses the order; factor 1 is uniform.

    >>> [round(v, 3) for v in shifted_prior([100, 10, 1], 4).tolist()], shifted_prior([100, 10, 1], 4, "backward").tolist()[0]
    ([0.571, 0.286, 0.143], 0.14285714285714285)
    """
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    rank = torch.empty(len(order), dtype=torch.float64)
    rank[order] = torch.arange(len(order), dtype=torch.float64)
    if direction == "backward":
        rank = len(order) - 1 - rank
    q = float(factor) ** (-rank / max(len(order) - 1, 1))
    return q / q.sum()


def _agnostic_keys(factors: Sequence[float]) -> List[tuple]:
    return ([(f"forward-{f:g}", f, "forward") for f in factors] + [("uniform", 1, "forward")]
            + [(f"backward-{f:g}", f, "backward") for f in reversed(factors)])


def agnostic_accuracy(per_class: Sequence[Optional[float]], class_counts: Sequence[int],
                      factors: Sequence[float] = AGNOSTIC_FACTORS) -> Dict[str, Optional[float]]:
    """Accuracy (%) under each test distribution of :func:`shifted_prior`, by exact importance weighting of the
    per-class accuracies measured on the (balanced) test set: Σ q_c acc_c over the classes present in it.

    >>> {k: round(v, 2) for k, v in agnostic_accuracy([90.0, 60.0, 30.0], [100, 10, 1], factors=(4,)).items()}
    {'forward-4': 72.86, 'uniform': 60.0, 'backward-4': 47.14}
    """
    return {key: prior_accuracy(per_class, shifted_prior(class_counts, factor, direction))
            for key, factor, direction in _agnostic_keys(factors)}


def prior_accuracy(per_class: Sequence[Optional[float]], prior: Sequence[float]) -> Optional[float]:
    """Accuracy (%) under a known test label distribution ``prior`` (one weight per class, any scale): the per-class
    accuracies weighted by it, Σ q_c acc_c / Σ q_c over the classes that have samples (exact importance weighting,
    as :func:`agnostic_accuracy` does for SADE's priors). None if no class with weight has samples.

    >>> prior_accuracy([90.0, 60.0, 30.0], [2, 1, 1]), prior_accuracy([90.0, None], [1, 3])
    (67.5, 90.0)
    """
    present = [c for c, a in enumerate(per_class) if a is not None]
    q = torch.as_tensor(prior, dtype=torch.float64)[present]
    if not present or float(q.sum()) <= 0:
        return None
    acc = torch.tensor([per_class[c] for c in present], dtype=torch.float64)
    return float((q * acc).sum() / q.sum())


def per_class_accuracy(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> List[Optional[float]]:
    """Accuracy (%) of each class over its test samples (None for a class without any), in one pass.

    >>> per_class_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    [50.0, 100.0, None]
    """
    hits = torch.bincount(targets, weights=(pred == targets).double(), minlength=num_classes).tolist()
    seen = torch.bincount(targets, minlength=num_classes).tolist()
    return [100.0 * (h / n) if n else None for h, n in zip(hits, seen)][:num_classes]


def agnostic_oracle(logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int],
                    factors: Sequence[float] = AGNOSTIC_FACTORS) -> Dict[str, Optional[float]]:
    """The same accuracies after post-hoc logit adjustment to the known test prior: z_c + log q_c - log π_c
    (π the training prior), the Bayes correction of a model of the training distribution; for logits that are
    already balanced (LA, Balanced Softmax, ``posthoc_tau``) it corrects twice, so read it for CE-like runs."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp(min=1)
    log_pi = torch.log(counts / counts.sum()).float()
    out: Dict[str, Optional[float]] = {}
    num_classes = logits.shape[1]
    for key, factor, direction in _agnostic_keys(factors):
        q = shifted_prior(class_counts, factor, direction)
        pred = (logits.float() + (q.log().float() - log_pi)).argmax(1)
        out[key] = agnostic_accuracy(per_class_accuracy(pred, targets, num_classes), class_counts, [factor])[key]
    return out


def confusion_matrix(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted].

    >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3).tolist()
    [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    return torch.bincount(targets * num_classes + pred, minlength=num_classes * num_classes).view(num_classes,
                                                                                                 num_classes)


def group_confusion(pred: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int]
                    ) -> Dict[str, Dict[str, Optional[float]]]:
    """Where each rank third's test samples go: % of the group's samples predicted as each group's classes (the
    3 x 3 confusion of the groups, without the C x C matrix: iNaturalist has 8,142 classes).

    >>> group_confusion(torch.tensor([0, 0, 0, 1, 2]), torch.tensor([2, 2, 2, 2, 2]), [100, 10, 1])["tail"]
    {'head': 60.0, 'middle': 20.0, 'tail': 20.0}
    """
    thirds = rank_thirds(class_counts)
    group = torch.empty(len(class_counts), dtype=torch.long)
    for g, classes in enumerate(thirds.values()):
        group[classes] = g
    blocks = confusion_matrix(group[pred], group[targets], len(thirds)).tolist()
    return {true: {name: 100.0 * n / sum(row) if sum(row) else None for name, n in zip(thirds, row)}
            for true, row in zip(thirds, blocks)}


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int], n_bins: int = 15, shifts: bool = True
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
    per_class = per_class_accuracy(pred, targets, num_classes)

    def group_mean(classes: Iterable[int]) -> Optional[float]:
        return _mean_or_none([per_class[c] for c in classes if per_class[c] is not None])

    shots = shot_groups(class_counts)
    thirds = rank_thirds(class_counts)
    present = [a for a in per_class if a is not None]
    out: Dict[str, object] = {
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
    if shifts:  # (off for per-epoch validation: the oracle re-scores every logit 11 times, ~10 s on iNat's scale)
        out["test_agnostic"] = agnostic_accuracy(per_class, class_counts)
        out["test_agnostic_oracle"] = agnostic_oracle(logits, targets, class_counts) if len(targets) else None
        out["confusion_groups"] = group_confusion(pred, targets, class_counts)
        if num_classes <= MAX_CONFUSION_CLASSES:
            out["confusion"] = confusion_matrix(pred, targets, num_classes).tolist()
    return out
