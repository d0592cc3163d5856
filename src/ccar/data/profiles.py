"""Long-tail profiles, the LDAM-DRW subset selection and the seeded validation split (method.md section 3)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..errors import DataError

PROFILES = ("exp", "step")


def long_tail_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp") -> List[int]:
    """Per-class training counts of a long-tailed version of a balanced set with ``n_max`` images per class.

    ``exp``: n_i = int(n_max * (1/imbalance)^(i/(C-1))), as in LDAM-DRW's ``imbalance_cifar.py``;
    ``step``: the first C//2 classes keep n_max, the rest int(n_max / imbalance).

    >>> long_tail_counts(5000, 10, 100)
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    >>> sum(long_tail_counts(500, 100, 100))
    10847
    """
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not imbalance >= 1:
        raise DataError(f"imbalance must be a number >= 1 (n_max / n_min), got {imbalance!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise DataError(f"n_max must be a positive integer, got {n_max!r}")
    factor = 1.0 / imbalance
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        counts = [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    elif profile == "step":
        half = num_classes // 2
        counts = [int(n_max)] * half + [int(n_max * factor)] * (num_classes - half)
    else:
        raise DataError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if min(counts) < 1:
        c = counts.index(min(counts))
        raise DataError(
            f"imbalance {imbalance:g} leaves class {c} empty (n_max={n_max}); use a smaller imbalance factor"
        )
    return counts


def long_tail_indices(targets: Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Source indices of the long-tailed subset, identical to LDAM-DRW's ``gen_imbalanced_data``.

    ``np.random.seed(seed)``, then for each class in label order: shuffle the class's indices and keep the
    first ``counts[c]``. A local RandomState gives the same stream without touching numpy's global state.

    >>> long_tail_indices([0, 0, 1, 1, 1], [2, 1]).tolist()
    [1, 0, 4]
    """
    targets = np.asarray(targets, dtype=np.int64)
    classes = np.unique(targets)
    if len(classes) != len(counts):
        raise DataError(f"the source has {len(classes)} classes but {len(counts)} counts were given")
    rng = np.random.RandomState(seed)
    selected = []
    for the_class, n in zip(classes, counts):
        idx = np.where(targets == the_class)[0]
        if n > len(idx):
            raise DataError(f"class {the_class} has {len(idx)} images, fewer than the {n} the profile asks for")
        rng.shuffle(idx)
        selected.append(idx[:n])
    return np.concatenate(selected)


def stratified_split(targets: Sequence[int], fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (train, val), proportional per class and seeded.

    Every class with two or more samples gives at least one to validation and keeps at least one for training.

    >>> train, val = stratified_split([0] * 10 + [1] * 2, 0.2, seed=0)
    >>> len(train), len(val)
    (9, 3)
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return np.arange(len(targets)), np.zeros(0, dtype=np.int64)
    rng = np.random.RandomState(seed + 1)  # a stream apart from the subset selection's
    train, val = [], []
    for c in np.unique(targets):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
