"""Training engine: the loop (:class:`~ccar.engine.trainer.Trainer`), its steps and callbacks, the assembly of a
run, evaluation, checkpoints and distributed plumbing. Names are re-exported lazily: importing ``ccar.engine``
loads nothing of the engine until one is used. (``train`` is also the name of its module: import the function as
``from ccar.engine.train import train``.)"""

import importlib

_EXPORTS = {
    "LossConfig": "ccar.config", "ModelConfig": "ccar.config", "OptimConfig": "ccar.config",
    "TrainConfig": "ccar.config", "apply_overrides": "ccar.config", "load_config": "ccar.config",
    "classification_metrics": "ccar.metrics", "expected_calibration_error": "ccar.metrics",
    "Trainer": "ccar.engine.trainer", "TrainState": "ccar.engine.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ccar.engine' has no attribute {name!r}")
