"""ccar: long-tailed classification with Class-Confidence Aware Reweighting (CCAR)."""

__version__ = "0.1.0"

from .errors import CCARError, ConfigError, DataError, LossError, TrainingError
from .losses import CCARLoss, build_loss, ccar_loss, omega_weight

__all__ = [
    "CCARError",
    "CCARLoss",
    "ConfigError",
    "DataError",
    "LossError",
    "TrainingError",
    "build_loss",
    "ccar_loss",
    "omega_weight",
]
