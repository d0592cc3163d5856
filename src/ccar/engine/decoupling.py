"""Classifier-level methods: two-stage decoupling (cRT, LWS; Kang et al. 2020), tau-normalisation, and MaxNorm for
weight balancing (Alshammari et al. 2022).

- cRT: the first stage's backbone frozen (BatchNorm statistics too), the classifier re-initialised and trained
  with class-balanced sampling;
- LWS: backbone and classifier frozen, one learnable scale per class on the classifier's logits;
- ft: the classifier kept and fine-tuned (weight balancing's second stage);
- LAS (MiSLAS's second stage, Zhong et al. 2021): the classifier kept and re-trained with label-aware smoothing
  (``loss.name=las``: the head smoothed most), class-balanced sampling, and BatchNorm's *statistics* shifted to the
  re-sampled data (the backbone runs in training mode; its weights and BatchNorm's affine parameters stay frozen);
- router (RIDE's second stage, Wang et al. 2021): the experts of a RIDE run frozen (BatchNorm statistics too), its
  routers trained with class-balanced sampling (``loss.name=ride-router``, :mod:`ccar.losses.router`);
- NCM: no training; the classifier becomes the nearest class mean: a cosine head whose class vectors are the means
  of the L2-normalised training features of each class (Kang et al. 2020's NCM with cosine similarity); its logits
  are cosine similarities in [-1, 1], so its ECE is not comparable with a trained classifier's;
- tau-norm: each classifier row w_c divided by ||w_c||^tau after training; ``tau_norm=auto`` picks tau on the
  validation split (balanced accuracy over the grid 0, 0.1, ..., 2.0), never on the test split;
- MaxNorm: after every optimizer step each classifier row is projected to norm <= delta.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..config.schema import RETRAIN_METHODS  # noqa: F401  (`ccar retrain RUN method=...`)
from ..errors import ConfigError
from ..models.heads import (NormedLinear, classifier, classifier_inputs, classifier_name, feature_norm_of,
                            linear_classifier)
from .distributed import gather_in_order
from .finetune import load_trained
from .inference import predict
from .run import Run

TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))


def prepare_retrain(model: nn.Module, method: str, parent_state: Dict[str, torch.Tensor], mode: str = "full") -> List[str]:
    """Load the first stage's weights (a run fine-tuned in ``mode``: what it trained), freeze all but what
    ``method`` trains; returns the trainable names."""
    if method == "router":  # RIDE's second stage: the parent's experts, frozen, under new routers
        return _prepare_router(model, parent_state)
    head_name = classifier_name(model)
    state = dict(parent_state)
    if method == "ncm":  # the parent's classifier (of its own kind) is replaced; set_class_means fills the new one
        state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}
        state.update({f"{head_name}.{k}": v for k, v in classifier(model).state_dict().items()})
    if method == "lws":  # the parent's classifier lives inside the wrapper, the scales start at 1
        state = {(k.replace(head_name + ".", head_name + ".classifier.", 1) if k.startswith(head_name + ".") else k): v
                 for k, v in state.items()}
        state[f"{head_name}.scale"] = torch.ones_like(classifier(model).scale)
    load_trained(model, state, mode, "the parent run's weights")
    head = classifier(model)
    if method == "crt":
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    for name, p in model.named_parameters():
        if method == "ncm":
            p.requires_grad_(False)
        elif method in ("crt", "ft", "las"):
            p.requires_grad_(name.startswith(head_name + "."))
        else:
            p.requires_grad_(name == f"{head_name}.scale")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _prepare_router(model: nn.Module, parent_state: Dict[str, torch.Tensor]) -> List[str]:
    missing, unexpected = model.load_state_dict(parent_state, strict=False)
    wrong = [k for k in missing if not k.startswith("router.")]
    if unexpected or wrong or getattr(model, "router", None) is None:
        raise ConfigError(f"method=router: the parent run's weights do not fit its experts under a router (missing "
                          f"{wrong[:3]}, unexpected {unexpected[:3]}); route a run trained with loss.name=ride")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("router."))
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def set_class_means(run: Run, batches=None) -> torch.Tensor:
    """NCM: the model's cosine classifier set to the mean L2-normalised feature of each class over ``batches`` (by
    default the training split, without augmentation; under torchrun gathered from every rank). Returns the means
    (C, D)."""
    head = classifier(run.model)
    if not isinstance(head, NormedLinear):
        raise ConfigError("method=ncm needs the cosine head `ccar retrain` builds for it")
    batches = run.eval_batches(run.data.train) if batches is None else batches
    features: List[torch.Tensor] = []
    hook = classifier_inputs(run.model, features, to_float=True)
    try:
        _, targets = predict(run, batches)
    finally:
        hook.remove()
    feats, targets = gather_in_order(run.dist, torch.cat(features).to(run.device), targets.to(run.device), batches)
    norm = feature_norm_of(run.model)  # the means of what the head sees
    feats = nn.functional.normalize((norm(feats) if norm is not None else feats).float(), dim=1)
    num_classes = head.weight.shape[1]
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, targets, feats)
    seen = torch.bincount(targets, minlength=num_classes)
    if (seen == 0).any():
        raise ConfigError(f"method=ncm: class {int((seen == 0).nonzero()[0])} has no training sample to average")
    means = sums / seen[:, None]
    head.weight.copy_(means.t().to(head.weight.dtype))  # NormedLinear: (in, out); it normalises the columns itself
    return means


@torch.no_grad()
def project_max_norm(model: nn.Module, max_norm: float) -> None:
    """MaxNorm: scale down every classifier row whose L2 norm exceeds ``max_norm``."""
    head = linear_classifier(model, "optim.max_norm")
    head.weight.copy_(torch.renorm(head.weight, p=2, dim=0, maxnorm=max_norm))


def tau_normalized_weight(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows w_c / ||w_c||^tau; tau = 0 is the identity.

    >>> tau_normalized_weight(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0).norm(dim=1).round(decimals=4).tolist()
    [1.0, 1.0]
    """
    if tau == 0:
        return weight
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


class TauNorm:
    """Apply tau-normalisation to a model's linear classifier within a ``with`` block (weights restored after)."""

    def __init__(self, model: nn.Module, tau: float):
        self.head, self.tau = linear_classifier(model, "tau_norm"), float(tau)

    def __enter__(self):
        self.saved = self.head.weight.detach().clone()
        with torch.no_grad():
            self.head.weight.copy_(tau_normalized_weight(self.saved, self.tau))
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            self.head.weight.copy_(self.saved)


def choose_tau(score: Callable[[float], float], grid: Tuple[float, ...] = TAU_GRID) -> Tuple[float, Dict[float, float]]:
    """The tau of ``grid`` with the best ``score(tau)`` (balanced accuracy on the validation split); ties: the smaller.

    >>> choose_tau(lambda tau: -abs(tau - 0.7))[0]
    0.7
    """
    scores = {tau: score(tau) for tau in grid}
    best = max(grid, key=lambda t: (scores[t], -t))
    return best, scores


def resolve_tau_norm(value: Optional[str]) -> Union[None, float, str]:
    """``tau_norm`` config value -> a float, None (off) or the string ``auto``."""
    if value is None:
        return None
    return "auto" if value == "auto" else float(value)
