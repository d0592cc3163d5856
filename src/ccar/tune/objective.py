"""What ``ccar tune`` maximises on the validation split, computed from a model's per-class accuracies with ccar's
own metrics (:mod:`ccar.metrics`): the balanced accuracy, the worst class, the tail third, or the accuracy under a
known deployment prior -- a list of class weights, or one of the test-agnostic priors (``forward-10``,
``backward-50``, ...), scored by exact importance weighting as the test-agnostic evaluation does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError
from ..metrics import prior_accuracy, shifted_prior

NAMED = ("balanced", "worst-class", "tail")
_SHIFTED = re.compile(r"^(forward|backward)-(\d+(?:\.\d+)?)$")


@dataclass
class Objective:
    """``name``: balanced, worst-class, tail, forward-F / backward-F (SADE's priors), or prior (``weights``)."""

    name: str
    weights: Optional[List[float]] = None

    def describe(self) -> str:
        if self.weights is not None:
            return "prior [" + ", ".join(f"{w:g}" for w in self.weights) + "]"
        return self.name

    def check(self, num_classes: int) -> None:
        """A prior must give one weight per class (a one-line error otherwise)."""
        if self.weights is not None and len(self.weights) != num_classes:
            raise ConfigError(f"objective: the prior has {len(self.weights)} class weights but the data has "
                              f"{num_classes} classes (one weight per class, in class-id order)")

    def score(self, metrics: Dict[str, Any], class_counts: Sequence[int]) -> Optional[float]:
        """The objective (%) of a split's metrics (:func:`ccar.metrics.classification_metrics`).

        >>> m = {"balanced": 60.0, "per_class": [90.0, 60.0, 30.0], "groups": {"tail": 30.0}}
        >>> [parse_objective(o).score(m, [100, 10, 1]) for o in ("balanced", "worst-class", "tail", [2, 1, 1])]
        [60.0, 30.0, 30.0, 67.5]
        """
        per_class = metrics.get("per_class") or []
        if self.name == "balanced":
            return metrics.get("balanced")
        if self.name == "worst-class":
            present = [a for a in per_class if a is not None]
            return min(present) if present else None
        if self.name == "tail":
            return (metrics.get("groups") or {}).get("tail")
        if self.weights is not None:
            return prior_accuracy(per_class, self.weights)
        direction, factor = _SHIFTED.match(self.name).groups()
        return prior_accuracy(per_class, shifted_prior(class_counts, float(factor), direction))


def parse_objective(value: Any) -> Objective:
    """``balanced``, ``worst-class``, ``tail``, ``forward-F`` / ``backward-F``, ``uniform`` (= balanced), or a list
    of non-negative class weights (a known deployment prior, any scale)."""
    if isinstance(value, (list, tuple)):
        try:
            weights = [float(w) for w in value]
        except (TypeError, ValueError):
            weights = []
        if not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"objective: a prior must be a list of class weights >= 0, not all 0; got {value!r}")
        return Objective("prior", weights)
    name = str(value).strip()
    if name == "uniform":
        name = "balanced"
    if name in NAMED or _SHIFTED.match(name):
        return Objective(name)
    raise ConfigError(f"unknown objective {value!r}; valid: {', '.join(NAMED)}, forward-F or backward-F "
                      f"(e.g. forward-10), or a prior as a list of class weights (objective=[5,2,1])")
