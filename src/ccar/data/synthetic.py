"""``dataset=gaussian-lt``: a synthetic long tail whose best possible balanced accuracy is known.

C Gaussian classes in d dimensions with a shared isotropic covariance: x = mu_y + eps, eps ~ N(0, I_d), with
seeded means mu_c = separation * u_c, u_c ~ N(0, I_d / d) (so two means lie about separation * sqrt(2) apart).
The training prior is long-tailed (exponential profile, ``imbalance``; the head keeps ``n_max`` samples, by
default 5 * imbalance so that the rarest class keeps 5), the test set is balanced (``test_per_class``).

For the balanced error the Bayes rule ignores the training prior: with equal priors and a shared isotropic
covariance it is the nearest class mean, argmin_c ||x - mu_c||. Its balanced accuracy on the very test samples
the models are scored on is recorded as ``bayes_balanced_accuracy`` (a paired reference: the gap of a model to it
is measured on the same draws). This data is synthetic; it says which losses are consistent for the balanced
error, not how they fare on images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from ..errors import DataError
from .profiles import long_tail_counts


@dataclass
class GaussianShape:
    """The shape of ``gaussian-lt``: the config's ``synthetic`` section."""

    num_classes: int = 100  # C, the number of classes
    dim: int = 32  # d, the dimension of the inputs
    separation: float = 3.0  # means separation * u_c, u_c ~ N(0, I_d / d): two lie about separation * sqrt(2) apart
    test_per_class: int = 100  # test samples of each class (the test set is balanced)

    def problems(self) -> List[Tuple[str, str, object]]:
        """(field, valid range, value) of every field out of its range; empty when all are valid."""
        rules = [("num_classes", self.num_classes >= 2, "an integer >= 2"), ("dim", self.dim >= 1, "an integer >= 1"),
                 ("separation", self.separation > 0, "a number > 0"),
                 ("test_per_class", self.test_per_class >= 1, "an integer >= 1")]
        return [(name, rule, getattr(self, name)) for name, ok, rule in rules if not ok]


@dataclass
class GaussianLT(GaussianShape):
    imbalance: float = 100.0
    n_max: int = 0  # 0: 5 * imbalance (the rarest class keeps 5 samples)
    data_seed: int = 0  # the means and samples; the run's seed moves only the validation split and training

    def check(self) -> None:
        for name, rule, value in self.problems():
            raise DataError(f"gaussian-lt: {name} must be {rule}, got {value!r}")

    def means(self) -> np.ndarray:
        rng = np.random.default_rng([self.data_seed, 1])
        return self.separation * rng.normal(size=(self.num_classes, self.dim)) / np.sqrt(self.dim)

    def counts(self) -> list:
        head = self.n_max or int(np.ceil(5 * self.imbalance))
        return long_tail_counts(head, self.num_classes, self.imbalance, "exp")

    def sample(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train X, train y, test X, test y), float32 features and int64 labels."""
        self.check()
        means, counts = self.means(), self.counts()
        rng = np.random.default_rng([self.data_seed, 2])
        y = np.repeat(np.arange(self.num_classes), counts)
        x = means[y] + rng.normal(size=(len(y), self.dim))
        yt = np.repeat(np.arange(self.num_classes), self.test_per_class)
        xt = means[yt] + rng.normal(size=(len(yt), self.dim))
        return x.astype(np.float32), y.astype(np.int64), xt.astype(np.float32), yt.astype(np.int64)


def nearest_mean_predictions(x: np.ndarray, means: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """argmin_c ||x - mu_c||: the Bayes rule for the balanced error under a shared isotropic covariance."""
    sq = (means**2).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = np.argmin(sq[None] - 2.0 * x[i : i + chunk].astype(np.float64) @ means.T, axis=1)
    return out


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Mean per-class accuracy (%).

    >>> balanced_accuracy(np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1]), 2)
    75.0
    """
    per = [float((pred[y == c] == c).mean()) for c in range(num_classes) if (y == c).any()]
    return 100.0 * float(np.mean(per))
