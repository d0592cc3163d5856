"""Scoring a model on a split: logits gathered across ranks, post-hoc adjustments, metrics.

Used by training (per-epoch validation, the final test evaluation), ``ccar eval`` and ``ccar predict``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..losses import posthoc_logit_adjustment
from .config import TrainConfig
from .decoupling import TauNorm, choose_tau, classifier, linear_classifier, resolve_tau_norm
from .distributed import DistContext
from ..metrics import classification_metrics
from .evaluate import predict


def eval_logit_scale(cfg: TrainConfig) -> float:
    """LDAM trains on s * (cosine - margin): evaluation scales the logits by s too, so that probabilities (ECE)
    and post-hoc adjustment live in the units the model was trained in. Argmax is unchanged."""
    return float(cfg.loss.scale or 30.0) if cfg.loss.uses_ldam else 1.0


def evaluate_split(model, batches, prepare, device, counts, ctx: DistContext, dtype=None, posthoc_tau=None,
                   logit_scale: float = 1.0, shifts: bool = True):
    """Metrics over a whole split; under data parallelism each rank predicts its shard, then logits are gathered.
    ``shifts=False``: without the test-agnostic scores and confusion (per-epoch validation)."""
    logits, targets = predict(model, batches, prepare, device, dtype)
    return logit_metrics(logits, targets, batches, device, counts, ctx, posthoc_tau, logit_scale, shifts)


def logit_metrics(logits, targets, batches, device, counts, ctx: DistContext, posthoc_tau=None, logit_scale=1.0,
                  shifts: bool = True):
    """Metrics of this rank's logits over ``batches``: scaled, gathered across ranks, post-hoc adjusted."""
    logits = logits * logit_scale
    if ctx.enabled:
        logits, targets = gather_in_order(ctx, logits.to(device), targets.to(device), batches)
        logits, targets = logits.cpu(), targets.cpu()
    if posthoc_tau:
        logits = posthoc_logit_adjustment(logits, counts, posthoc_tau)
    return classification_metrics(logits, targets, counts, shifts=shifts)


def gather_in_order(ctx: DistContext, values: torch.Tensor, targets: torch.Tensor, batches
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of a split (``batches``: its evaluation loader) gathered back into the split's order."""
    if not ctx.enabled:
        return values, targets
    n = len(batches.targets) if hasattr(batches, "targets") else len(batches.dataset)
    values, targets = ctx.all_gather_cat(values), ctx.all_gather_cat(targets)
    # DeviceLoader/DistributedSampler stride the (padded) order over ranks: undo the interleaving, drop padding.
    per = len(values) // ctx.world_size
    order = torch.arange(per * ctx.world_size, device=values.device).view(ctx.world_size, per).t().reshape(-1)
    return values[order][:n], targets[order][:n]


def split_size(split) -> int:
    return len(split[1]) if isinstance(split, tuple) else len(split)


def split_evaluator(cfg, data, model, eval_batches, prepare, device, ctx, dtype) -> Callable[[object], dict]:
    """``evaluate(split)``: metrics of ``model`` on a split of ``data`` with the run's logit scale and post-hoc LA."""
    def evaluate(split):
        return evaluate_split(model, eval_batches(split), prepare, device, data.class_counts, ctx, dtype,
                              cfg.posthoc_tau, eval_logit_scale(cfg))

    return evaluate


def tau_scorer(cfg, data, model, eval_batches, prepare, device, ctx, dtype) -> Callable[[float], float]:
    """``score(tau)``: balanced validation accuracy of ``model`` tau-normalised with ``tau``. The backbone runs once
    over the split (the classifier's inputs are kept, batch by batch); each tau then costs only the classifier."""
    linear_classifier(model, "tau_norm")  # a cosine head is an error before any work
    head = classifier(model)
    features: List[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].detach()))
    batches = eval_batches(data.val)
    try:
        _, targets = predict(model, batches, prepare, device, dtype)
    finally:
        hook.remove()

    def score(tau: float) -> float:
        with TauNorm(model, tau), torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                                  enabled=dtype is not None):
            logits = torch.cat([head(f).float().cpu() for f in features])
        return logit_metrics(logits, targets, batches, device, data.class_counts, ctx, cfg.posthoc_tau,
                             eval_logit_scale(cfg), shifts=False)["balanced"]

    return score


def chosen_tau(cfg, data, model, eval_batches, prepare, device, ctx, dtype
               ) -> Tuple[Optional[float], Optional[Dict[float, float]]]:
    """The run's tau-normalisation: None (off), the configured tau, or for ``auto`` the tau chosen on the
    validation split (never on the test split), with the validation scores of the grid."""
    tau = resolve_tau_norm(cfg.tau_norm)
    if tau != "auto":
        return tau, None
    if not split_size(data.val):
        raise ConfigError("tau_norm=auto chooses tau on the validation split; this run has none (val_fraction=0)")
    return choose_tau(tau_scorer(cfg, data, model, eval_batches, prepare, device, ctx, dtype))


def evaluate_test_split(cfg, data, model, eval_batches, prepare, device, ctx, dtype) -> Dict[str, object]:
    """Test-set metrics of ``model`` with the run's post-hoc settings: logit adjustment (``posthoc_tau``) and
    tau-normalisation (``tau_norm``, see :func:`chosen_tau`)."""
    evaluate = split_evaluator(cfg, data, model, eval_batches, prepare, device, ctx, dtype)
    tau, scores = chosen_tau(cfg, data, model, eval_batches, prepare, device, ctx, dtype)
    if tau is None:
        return evaluate(data.test)
    with TauNorm(model, tau):
        metrics = evaluate(data.test)
    metrics["tau_norm"] = tau
    if scores is not None:
        metrics["tau_norm_val_balanced"] = {str(t): v for t, v in scores.items()}
    return metrics
