"""``ccar retrain RUN_DIR method=crt|lws|ft|las|ncm|router``: the second stage of decoupled training (Kang et al. 2020) as a new run.

The parent run's best-on-validation model is loaded, everything but the classifier is frozen (BatchNorm
statistics too), and the classifier is trained with class-balanced sampling: cRT re-initialises it, LWS keeps it
and learns one scale per class, ``ft`` keeps it and fine-tunes it (the second stage of weight balancing, usually
with ``sampler=instance loss.name=cb optim.max_norm=...``). Defaults (each overridable with ``key=value``): 10 epochs, plain cross-entropy,
``sampler=class-balanced``, no warm-up, cosine schedule, the parent's optimizer otherwise. The result is a run
folder like any other, whose ``config.yaml`` names its parent (``parent``, ``retrain``). ``method=ncm`` trains
nothing: the classifier becomes the nearest class mean of the frozen backbone's training features. ``method=las``
is MiSLAS's second stage: the classifier kept and re-trained with label-aware smoothing (``loss.name=las``,
``loss.smooth_head`` 0.4, ``loss.smooth_tail`` 0.1, ``loss.smooth_shape`` concave: MiSLAS's CIFAR-100-LT values)
while BatchNorm's statistics follow the class-balanced data (shift learning). ``method=router`` is RIDE's second
stage, for a RIDE run only: its experts frozen, its routers trained (``loss.name=ride-router``; RIDE's CIFAR recipe:
5 epochs, lr 0.01 with Nesterov momentum, class-balanced sampling).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Sequence

from ..config import LossConfig, apply_overrides, load_config, validate
from ..config.schema import RETRAIN_METHODS as METHODS
from ..errors import ConfigError
from .train import train


def retrain_config(run_dir: Path, overrides: Sequence[str] = ()):
    """The second stage's config: the parent's, with the retrain defaults and ``overrides`` (``method=`` among them)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file() or not (run_dir / "best.safetensors").is_file():
        raise ConfigError(f"{run_dir} is not a finished ccar run (needs config.yaml and best.safetensors)")
    method, rest = None, []
    for item in overrides:
        if item.startswith("method="):
            method = item.split("=", 1)[1].strip()
        else:
            rest.append(item)
    if method not in METHODS:
        raise ConfigError(f"ccar retrain needs method={', method='.join(METHODS[:-1])} or method={METHODS[-1]} "
                          f"(router: a RIDE run's second stage), got {method!r}")
    parent = load_config(str(config))
    if parent.retrain:
        raise ConfigError(f"{run_dir} is itself a retrained run; retrain its parent {parent.parent} instead")
    if (method == "router") != (parent.loss.method == "ride"):
        raise ConfigError(f"method=router routes RIDE's experts: {run_dir} was trained with loss {parent.loss.method}"
                          if method == "router" else f"{run_dir} trained RIDE's experts: its second stage is "
                          f"method=router (classifier re-training would treat them as one model)")
    cfg = copy.deepcopy(parent)
    cosine = parent.model.head == "cosine" or (parent.model.head == "auto" and parent.loss.uses_ldam)
    cfg.model.head = "cosine" if cosine or method == "ncm" else "linear"  # the parent's classifier type, whatever
    # the new loss; NCM's class means are a cosine head
    cfg.loss = LossConfig(name={"las": "las", "router": "ride-router"}.get(method, "ce"), base=None,
                          scale=parent.loss.scale if method == "router" else None)  # (the experts' units)
    cfg.epochs, cfg.sampler, cfg.sampler_epoch = 10, "class-balanced", 0
    cfg.optim.warmup_epochs, cfg.optim.schedule = 0, "cosine"
    if method == "router":  # RIDE's CIFAR router recipe: 5 epochs, lr 0.01, Nesterov
        cfg.epochs, cfg.optim.lr, cfg.optim.nesterov = 5, 0.01, True
    cfg.tau_norm, cfg.posthoc_tau = None, None
    cfg.out = str(run_dir.parent / f"{run_dir.name}-{method}")
    cfg.retrain, cfg.parent = method, str(run_dir)
    apply_overrides(cfg, rest)
    if cfg.retrain != method or cfg.parent != str(run_dir):
        raise ConfigError(f"retrain and parent are set by `ccar retrain`; pass method={'|'.join(METHODS)} and the run "
                          f"folder")
    return validate(cfg)


def retrain(run_dir: Path, overrides: Sequence[str] = (), resume: bool = False, log=print) -> Dict[str, object]:
    """Run the second stage; returns its metrics (as ``train`` does)."""
    return train(retrain_config(run_dir, overrides), resume=resume, log=log)
