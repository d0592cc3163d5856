"""A trial as configs: the first stage's run config (evaluation-only settings cleared, so that every method over
the same model trains it once), the evaluation settings applied to the final model, and the second stage's
``ccar retrain`` overrides. Run folders are named by what they train, so a setting tried twice, or a first stage
that several methods share (CE, tau-norm, post-hoc LA, cRT), is trained once."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import TrainConfig, apply_overrides, to_dict, validate
from ..sweep.spec import EVAL_ONLY
from .candidates import Method

# Keys that change where or how verbosely a run goes, not what it trains
NOT_TRAINING = EVAL_ONLY + ("out", "progress", "threads", "feature_cache", "resume")


def _as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def identity(cfg: TrainConfig) -> str:
    """A short hash of what ``cfg`` trains (its resolved config less :data:`NOT_TRAINING`)."""
    resolved = to_dict(cfg)
    for key in NOT_TRAINING:
        resolved.pop(key, None)
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:10]


def folder_name(cfg: TrainConfig) -> str:
    """``<loss>[-<sampler>][-<mix>]-s<seed>-<identity>``: readable, and unique per trained model."""
    parts = [cfg.loss.name + (f"-{cfg.loss.base}" if cfg.loss.name == "ccar" else "")]
    parts += [cfg.sampler] if cfg.sampler != "instance" else []
    parts += [cfg.mix] if cfg.mix != "none" else []
    return "-".join(parts + [f"s{cfg.seed}", identity(cfg)])


@dataclass
class TrialPlan:
    """``train``: the first stage (its ``out`` set); ``evals``: tau_norm / posthoc_tau of the final model;
    ``stage2``: the retrain overrides or None; ``params``: the knobs as the search named them."""

    method: str
    params: Dict[str, Any]
    train: TrainConfig
    evals: Dict[str, Any] = field(default_factory=dict)
    stage2: Optional[List[str]] = None

    @property
    def first_dir(self) -> Path:
        return Path(self.train.out)

    @property
    def is_variant(self) -> bool:
        """Whether the method scores its model with its own evaluation settings (tau-norm, post-hoc LA)."""
        return any(v is not None for v in self.evals.values())


def _stage2_overrides(method: Method, params: Dict[str, Any], base: TrainConfig) -> List[str]:
    over = dict(method.stage2 or {})
    over.setdefault("epochs", max(1, round(base.epochs / 4)))  # the studies: 3 of 12 epochs, 10 of 40
    for key, value in params.items():
        if key == "stage2.lr":
            over["optim.lr"] = value * base.optim.lr
        elif key.startswith("stage2."):
            over[key[len("stage2."):]] = value
    return [_as_override(k, v) for k, v in over.items()]


def plan_trial(base: TrainConfig, method: Method, params: Dict[str, Any], runs: Path,
               seed: Optional[int] = None) -> TrialPlan:
    """The configs of ``method`` with knob values ``params`` over ``base`` (at ``seed``, default: base's)."""
    over: Dict[str, Any] = dict(method.fixed)
    for key, value in params.items():
        if key == "lr":
            over["optim.lr"] = value * base.optim.lr
        elif key == "tune":
            over.update(method.choices[value])
        elif not key.startswith("stage2."):
            over[key] = value
    cfg = copy.deepcopy(base)
    apply_overrides(cfg, [_as_override(k, v) for k, v in over.items()])
    if seed is not None:
        cfg.seed = seed
    validate(cfg)  # (with its evaluation settings: a bad posthoc_tau is named here)
    evals = {k: getattr(cfg, k) for k in EVAL_ONLY}
    for key in EVAL_ONLY:
        setattr(cfg, key, None)
    cfg.progress = False
    validate(cfg)
    cfg.out = str(runs / folder_name(cfg))
    stage2 = _stage2_overrides(method, params, base) if method.stage2 is not None else None
    return TrialPlan(method.name, dict(params), cfg, evals, stage2)
