"""The end of a trial's run: where ``ccar train`` scores the test split (:func:`ccar.engine.finish.finish`), a trial
scores the **validation** split only. Its folder gets the weight files an ordinary run has (``best`` on validation,
``last``), so ``ccar retrain``, ``ccar eval`` and ``ccar predict`` take it, and ``validation.json``: the selected
epoch, the curve, and the validation scores under each evaluation setting asked of it (plain, tau-norm, post-hoc
LA), kept so that a later trial over the same model only reads them."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import TrainConfig
from ..engine import checkpoint as ckpt
from ..engine.build import load_run, with_feature_cache
from ..engine.decoupling import TauNorm
from ..engine.features import uses_cache
from ..engine.finetune import load_trained, saved_state
from ..engine.scoring import chosen_tau, evaluate_split
from ..errors import TrainingError
from ..sweep.spec import EVAL_ONLY

RECORD = "validation.json"
KEEP = ("top1", "balanced", "per_class", "many", "medium", "few", "groups", "ece", "n")


def eval_key(evals: Dict[str, Any]) -> str:
    """The evaluation settings as a key of ``validation.json``'s scores (every evaluation-only key, unset: None)."""
    return json.dumps({k: evals.get(k) for k in EVAL_ONLY}, sort_keys=True)


@contextlib.contextmanager
def _settings(run, evals: Dict[str, Any]):
    """``run`` scored with the evaluation settings ``evals`` (tau_norm, posthoc_tau) for the duration."""
    saved = {k: getattr(run.cfg, k) for k in evals}
    for k, v in evals.items():
        setattr(run.cfg, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(run.cfg, k, v)


def score_validation(run, evals: Dict[str, Any]) -> Dict[str, Any]:
    """Validation metrics of ``run.model`` with the evaluation settings ``evals`` (tau_norm=auto chooses tau on
    the validation split, as ``ccar eval`` does); never the test split."""
    with _settings(run, evals):
        tau, _ = chosen_tau(run)
        with TauNorm(run.model, tau) if tau is not None else contextlib.nullcontext():
            metrics = evaluate_split(run, run.data.val, shifts=False)
    out = {k: metrics[k] for k in KEEP if k in metrics}
    if tau is not None:
        out["tau_norm"] = tau
    return out


def finish_validation(trainer, state, evals: Dict[str, Any]) -> Dict[str, Any]:
    """Write the trial run's weights and ``validation.json`` (plain scores, and those under ``evals``); returns
    the record."""
    run = trainer.run
    cfg = run.cfg
    last = saved_state(run.model, cfg.finetune, clone=True)
    best = state.best_state or last
    load_trained(run.model, best, cfg.finetune)
    history = state.history
    best_epoch = (max(range(len(history)), key=lambda i: (history[i]["val_balanced"] or -1, -i)) + 1
                  if history and state.best_state is not None else len(history))
    plain = {k: None for k in EVAL_ONLY}
    scores = {eval_key(plain): score_validation(run, plain)}
    if any(v is not None for v in evals.values()):
        scores[eval_key(evals)] = score_validation(run, evals)
    record = {"best_epoch": best_epoch, "epochs": len(history), "seconds": history[-1]["seconds"] if history else 0.0,
              "class_counts": run.data.class_counts, "history": history, "scores": scores}
    ckpt.save_weights(run.run_dir / "best.safetensors", best)
    ckpt.save_weights(run.run_dir / "last.safetensors", last)
    (run.run_dir / RECORD).write_text(json.dumps(record))
    return record


def read_record(folder: Path) -> Optional[Dict[str, Any]]:
    """A finished trial run's ``validation.json`` (None if it has not finished)."""
    path = Path(folder) / RECORD
    if not path.is_file() or not (Path(folder) / "best.safetensors").is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cut short by a crash: the run's checkpoint is complete, it finishes again


def scores_of(folder: Path, cfg: TrainConfig, evals: Dict[str, Any]) -> Dict[str, Any]:
    """The validation scores of a finished folder's model under ``evals``: read, or computed once and kept."""
    record = read_record(folder)
    if record is None:
        raise TrainingError(f"{folder} has not finished (no {RECORD})")
    key = eval_key(evals)
    if key not in record["scores"]:
        variant = copy.deepcopy(cfg)
        variant.out, variant.progress = str(folder), False
        run = load_run(variant, Path(folder) / "best.safetensors")
        if uses_cache(variant):
            run, _ = with_feature_cache(run)
        record["scores"][key] = score_validation(run, evals)
        (Path(folder) / RECORD).write_text(json.dumps(record))
    return record["scores"][key]
