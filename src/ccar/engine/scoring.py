"""Scoring a run's model on a split: logits gathered across ranks, post-hoc adjustments, metrics.

Used by training (per-epoch validation, the final test evaluation), ``ccar eval`` and ``ccar predict``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..losses import posthoc_logit_adjustment
from ..metrics import classification_metrics
from ..models.heads import classifier, classifier_inputs, linear_classifier
from .decoupling import TauNorm, choose_tau, resolve_tau_norm
from .distributed import gather_in_order
from .inference import predict
from .run import Run, split_size


def eval_logit_scale(cfg: TrainConfig) -> float:
    """LDAM trains on s * (cosine - margin): evaluation scales the logits by s too, so that probabilities (ECE)
    and post-hoc adjustment live in the units the model was trained in. Argmax is unchanged."""
    return float(cfg.loss.scale or 30.0) if cfg.loss.uses_ldam else 1.0


def logit_metrics(logits: torch.Tensor, targets: torch.Tensor, counts: Sequence[int], posthoc_tau=None,
                  shifts: bool = True) -> Dict[str, object]:
    """Metrics of a whole split's logits (already in the units of :func:`eval_logit_scale`), post-hoc adjusted.
    ``shifts=False``: without the test-agnostic scores and confusion (per-epoch validation)."""
    if posthoc_tau:
        logits = posthoc_logit_adjustment(logits, counts, posthoc_tau)
    return classification_metrics(logits, targets, counts, shifts=shifts)


def _gathered(run: Run, logits: torch.Tensor, targets: torch.Tensor, batches) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's logits of ``batches`` with every other rank's, in the split's order, on the CPU."""
    if not run.dist.enabled:
        return logits, targets
    logits, targets = gather_in_order(run.dist, logits.to(run.device), targets.to(run.device), batches)
    return logits.cpu(), targets.cpu()


def evaluate_split(run: Run, split, shifts: bool = True) -> Dict[str, object]:
    """Metrics of ``run.model`` over a whole split with the run's logit scale and post-hoc LA; under data
    parallelism each rank predicts its shard, then the logits are gathered."""
    batches = run.eval_batches(split)
    logits, targets = predict(run, batches)
    scale = eval_logit_scale(run.cfg)
    logits, targets = _gathered(run, logits * scale, targets, batches)
    return logit_metrics(logits, targets, run.data.class_counts, run.cfg.posthoc_tau, shifts=shifts)


def tau_scorer(run: Run) -> Callable[[float], float]:
    """``score(tau)``: balanced validation accuracy of the model tau-normalised with ``tau``. The backbone runs once
    over the split (the classifier's inputs are kept, batch by batch); each tau then costs only the classifier."""
    linear_classifier(run.model, "tau_norm")  # a cosine head is an error before any work
    head = classifier(run.model)
    features: List[torch.Tensor] = []
    batches = run.eval_batches(run.data.val)
    hook = classifier_inputs(run.model, features)
    try:
        _, targets = predict(run, batches)
    finally:
        hook.remove()
    scale = eval_logit_scale(run.cfg)

    def score(tau: float) -> float:
        with TauNorm(run.model, tau), torch.no_grad(), run.autocast():
            logits = torch.cat([head(f).float().cpu() for f in features])
        logits, gathered = _gathered(run, logits * scale, targets, batches)
        return logit_metrics(logits, gathered, run.data.class_counts, run.cfg.posthoc_tau, shifts=False)["balanced"]

    return score


def chosen_tau(run: Run) -> Tuple[Optional[float], Optional[Dict[float, float]]]:
    """The run's tau-normalisation: None (off), the configured tau, or for ``auto`` the tau chosen on the
    validation split (never on the test split), with the validation scores of the grid."""
    tau = resolve_tau_norm(run.cfg.tau_norm)
    if tau != "auto":
        return tau, None
    if not split_size(run.data.val):
        raise ConfigError("tau_norm=auto chooses tau on the validation split; this run has none (val_fraction=0)")
    return choose_tau(tau_scorer(run))


def evaluate_test_split(run: Run) -> Dict[str, object]:
    """Test-set metrics of the model with the run's post-hoc settings: logit adjustment (``posthoc_tau``) and
    tau-normalisation (``tau_norm``, see :func:`chosen_tau`)."""
    tau, scores = chosen_tau(run)
    if tau is None:
        return evaluate_split(run, run.data.test)
    with TauNorm(run.model, tau):
        metrics = evaluate_split(run, run.data.test)
    metrics["tau_norm"] = tau
    if scores is not None:
        metrics["tau_norm_val_balanced"] = {str(t): v for t, v in scores.items()}
    return metrics
