"""Typed run configuration: the schema (dataclasses and valid values), loading from YAML with ``key=value``
overrides, and range validation. It imports nothing from the engine: the engine reads it."""

from .loading import apply_overrides, load_config, load_yaml, parse_override, save_config
from .schema import (AugmentConfig, HeadInit, LoraOptions, LossConfig, ModelConfig, OptimConfig, TrainConfig,
                     to_dict)
from .validation import validate

__all__ = ["AugmentConfig", "HeadInit", "LoraOptions", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "apply_overrides", "load_config", "load_yaml", "parse_override", "save_config", "to_dict", "validate"]
