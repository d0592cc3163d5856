"""Long-tail losses: functional forms, ``nn.Module`` wrappers and :func:`build_loss`."""

from .functional import (
    BASES,
    balanced_softmax_loss,
    ccar_loss,
    class_balanced_loss,
    cross_entropy,
    focal_loss,
    ldam_loss,
    logit_adjusted_loss,
    omega_weight,
    posthoc_logit_adjustment,
    vs_loss,
)
from .modules import CCARLoss, LongTailLoss
from .registry import LOSS_NAMES, build_loss
from .stats import class_balanced_weights, ldam_margins

__all__ = [
    "BASES",
    "LOSS_NAMES",
    "CCARLoss",
    "LongTailLoss",
    "balanced_softmax_loss",
    "build_loss",
    "ccar_loss",
    "class_balanced_loss",
    "class_balanced_weights",
    "cross_entropy",
    "focal_loss",
    "ldam_loss",
    "ldam_margins",
    "logit_adjusted_loss",
    "omega_weight",
    "posthoc_logit_adjustment",
    "vs_loss",
]
