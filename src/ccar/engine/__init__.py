"""Training engine: configuration, the training loop, evaluation, checkpoints and distributed plumbing."""

from .config import LossConfig, ModelConfig, OptimConfig, TrainConfig, apply_overrides, load_config
from ..metrics import classification_metrics, expected_calibration_error
from .train import train

__all__ = [
    "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig", "apply_overrides", "classification_metrics",
    "expected_calibration_error", "load_config", "train",
]
