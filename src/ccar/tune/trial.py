"""One trial of ``ccar tune``: its first stage trained (or found finished, or continued from its checkpoint), its
second stage likewise, then its final model scored on the validation split. Each stage is an ordinary run through
the engine (:func:`ccar.engine.train.prepare` and the trainer's loop) with one more callback, the
:class:`~ccar.tune.monitor.TrialMonitor`, and ends with :func:`~ccar.tune.validation.finish_validation` instead of
the test evaluation."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..config import TrainConfig
from ..engine.retrain import retrain_config
from ..engine.train import prepare
from .monitor import TrialMonitor, TrialStopped
from .plan import TrialPlan, identity
from .validation import finish_validation, read_record, scores_of


@dataclass
class TrialResult:
    """``status``: complete, pruned or deadline; ``metrics``: the final model's validation scores (complete only);
    ``model_dir`` / ``model_cfg``: the folder and config of the final model; ``trained``: epochs this trial ran
    (0: everything was found finished)."""

    status: str
    metrics: Optional[Dict[str, Any]]
    model_dir: Path
    model_cfg: TrainConfig
    seconds: float
    trained: int
    epochs: int = 0


def _quiet(*_args, **_kwargs) -> None:
    return None


def train_stage(cfg: TrainConfig, monitor: TrialMonitor, evals: Dict[str, Any]) -> int:
    """Train ``cfg`` into its folder unless it has finished (continuing its checkpoint if it has one); returns the
    epochs trained here. A stop (pruner, deadline) leaves the last epoch's checkpoint."""
    folder = Path(cfg.out)
    if read_record(folder) is not None:
        return 0
    trainer = prepare(copy.deepcopy(cfg), resume=(folder / "checkpoint.safetensors").exists(), log=_quiet)
    before = len(trainer.state.history)
    trainer.callbacks.items.append(monitor)  # (last: the epoch's checkpoint is written before it may stop the run)
    try:
        state = trainer.fit()
    except TrialStopped as stop:
        stop.trained = len(trainer.state.history) - before
        raise
    finish_validation(trainer, state, evals)
    return len(state.history) - before


def stage2_config(plan: TrialPlan, runs: Path) -> TrainConfig:
    """The second stage's config: ``ccar retrain``'s, in a folder named by the first stage and what it trains."""
    cfg = retrain_config(plan.first_dir, plan.stage2 + ["progress=false"]
                         + ([f"feature_cache={plan.train.feature_cache}"] if plan.train.feature_cache else []))
    method = cfg.retrain
    cfg.out = str(runs / f"{plan.first_dir.name}-{method}-{identity(cfg)}")
    return cfg


def run_plan(plan: TrialPlan, runs: Path, report: Optional[Callable[[int, float], bool]], deadline: float,
             score: Optional[Callable] = None) -> TrialResult:
    """Run a trial. ``report``: the search's per-epoch report (returns True to prune); used where the per-epoch
    score is the method's own: single-stage methods scored plainly, and second stages (their step offset by the
    first stage's epochs). ``deadline``: ``time.monotonic()`` after which the trial stops."""
    started, trained = time.perf_counter(), 0
    own = report if plan.stage2 is None and not plan.is_variant else None
    model_dir, model_cfg = plan.first_dir, plan.train
    try:
        trained += train_stage(plan.train, TrialMonitor(own, deadline, score), plan.evals)
        if plan.stage2 is not None:
            model_cfg = stage2_config(plan, runs)
            model_dir = Path(model_cfg.out)
            trained += train_stage(model_cfg, TrialMonitor(report, deadline, score, offset=plan.train.epochs), {})
        metrics = scores_of(model_dir, model_cfg, plan.evals)
    except TrialStopped as stop:
        return TrialResult(stop.reason, None, model_dir, model_cfg, time.perf_counter() - started,
                           trained + getattr(stop, "trained", 0), stop.epoch)
    return TrialResult("complete", metrics, model_dir, model_cfg, time.perf_counter() - started, trained,
                       read_record(model_dir)["epochs"])
