"""RIDE's expert router (Wang et al., ICLR 2021, "routing diversified experts"), its second stage.

With the experts trained and frozen, a small router after each expert but the last decides per image whether the
next expert is needed: at test time an image stops at the first expert whose router says "enough", and its
prediction is the mean of the experts it consulted -- fewer experts per image for about the same accuracy. Router
i is trained to say "ask" exactly where the ensemble of experts 1..i+1 is wrong but one of the larger ensembles is
right, by a binary cross-entropy whose positive class is weighted by ``pos_weight`` (RIDE's CIFAR-100 setting: 100).
The model's side (the routers' inputs, the routed evaluation) is :class:`ccar.models.families.MultiExpert`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LossError
from .experts import FamilyLoss, _f32, _number
from .stats import CountsLike


def router_targets(experts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, E-1) booleans: router i should ask for expert i+2 (1-based) -- the mean of experts 1..i+1 is wrong and
    the mean of 1..j is right for some j > i+1. ``experts`` (E, B, C) logits.

    >>> z = torch.tensor([[[0.0, 1.0]], [[3.0, 0.0]], [[0.0, 0.0]]])  # expert 1 wrong, 1+2 right, 1+2+3 right
    >>> router_targets(z, torch.tensor([0])).tolist()
    [[True, False]]
    """
    correct = _f32(experts).cumsum(0).argmax(2) == targets.unsqueeze(0)  # (E, B): the ensemble of the first e+1
    later = correct.flip(0).int().cummax(0).values.flip(0).bool()  # later[e]: some ensemble of e+1 or more is right
    return (~correct[:-1] & later[1:]).t()


def router_loss(experts: torch.Tensor, router_logits: torch.Tensor, targets: torch.Tensor,
                pos_weight: float = 100.0) -> torch.Tensor:
    """Per image: the mean over the E-1 routers of ``BCE(router_logit, router_targets)`` with the positive term
    weighted by ``pos_weight`` (as RIDE's ``binary_cross_entropy_with_logits(..., pos_weight)``).

    >>> z = torch.tensor([[[0.0, 1.0]], [[3.0, 0.0]], [[0.0, 0.0]]])
    >>> round(router_loss(z, torch.zeros(1, 2), torch.tensor([0]), pos_weight=2.0).item(), 6)  # (2 log 2 + log 2) / 2
    1.039721
    """
    if router_logits.ndim != 2 or router_logits.shape != (experts.shape[1], experts.shape[0] - 1):
        raise LossError(f"ride-router: outputs['router'] must be (B, E-1) = ({experts.shape[1]}, "
                        f"{experts.shape[0] - 1}), got {tuple(router_logits.shape)}")
    goal = router_targets(experts.detach(), targets).float()
    weight = torch.tensor(float(pos_weight), device=router_logits.device)
    return F.binary_cross_entropy_with_logits(_f32(router_logits), goal, pos_weight=weight, reduction="none").mean(1)


class RIDERouterLoss(FamilyLoss):
    """:func:`router_loss` over a routed multi-expert model's training outputs (``"experts"`` (E, B, C),
    ``"router"`` (B, E-1)); options ``pos_weight`` (100) and ``scale`` (30: the RIDE run's logit scale s, the units
    its routers' inputs and its evaluation take; the routing targets, argmaxes, do not depend on it). Trained by
    ``ccar retrain RUN method=router``."""

    name = "ride-router"
    OPTIONS = ("pos_weight", "scale")
    CCAR = False

    def __init__(self, class_counts: CountsLike, reduction: str = "mean", *, pos_weight: float = 100.0,
                 scale: float = 30.0, ccar: bool = False, **unknown):
        if ccar:
            raise LossError("ride-router trains RIDE's router, not a classifier: CCAR does not apply to it")
        super().__init__(class_counts, reduction, False, {}, unknown)
        self.pos_weight = _number(pos_weight, "pos_weight", self.name, 0.0, strict=True)
        self.scale = _number(scale, "scale", self.name, 0.0, strict=True)

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        experts = self._output(outputs, "experts", "each expert's logits, (E, B, C)")
        router = self._output(outputs, "router", "the routers' logits (B, E-1): a model built by `ccar retrain RUN "
                                                 "method=router`")
        self._check_targets(experts[0], targets)
        self._check_logits(experts[0], targets.shape[0], "each expert's logits")
        return self._reduce(router_loss(experts, router, targets, self.pos_weight))
