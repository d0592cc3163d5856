"""Functional long-tail losses: pure functions of (logits, targets, class counts).

Every base loss is described by a :class:`BaseSpec`: how it adjusts the logits (a per-class additive shift for
logit adjustment and Balanced Softmax, a margin and a scale for LDAM), an optional per-class weight
(class-balanced, DRW) and a focal exponent. The per-sample base loss is then
``w_y * -(1 - p_t)^gamma * log p_t`` with ``p_t = softmax(z)_y`` on the adjusted logits ``z``, and CCAR multiplies
it by its confidence- and frequency-aware weight Omega(p_t, f_c). All math runs in float32 (float64 stays
float64), also when the logits arrive in bf16/fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import LossError
from .stats import (
    CountsLike,
    as_counts,
    check_num_classes,
    check_omega,
    check_targets,
    class_balanced_weights,
    class_frequency,
    ldam_margins,
)

REDUCTIONS = ("mean", "sum", "none")
BASES = ("ce", "focal", "cb", "cb-focal", "ldam", "la", "bs", "vs", "las")
# Options each base accepts, with defaults (method.md section 2).
BASE_OPTIONS = {
    "ce": {},
    "focal": {"gamma": 1.0},
    "cb": {"beta": 0.9999, "form": "ce", "gamma": 1.0},
    "cb-focal": {"beta": 0.9999, "gamma": 1.0},
    "ldam": {"max_margin": 0.5, "scale": 30.0},
    "la": {"tau": 1.0},
    "bs": {},
    "vs": {"gamma": 0.2, "tau": 1.5},
    "las": {"smooth_head": 0.4, "smooth_tail": 0.1, "smooth_shape": "concave"},
}
_NEEDS_POSITIVE = {"cb", "cb-focal", "ldam", "la", "bs", "vs", "las"}
LAS_SHAPES = ("concave", "linear", "convex")
_TINY = 1e-30


@dataclass
class BaseSpec:
    """Per-class description of a base loss (CPU tensors; modules keep them as buffers on the device)."""

    name: str
    shift: Optional[torch.Tensor] = None  # added to the logits (LA: tau*log(prior), BS: log(n), VS: tau*log(prior))
    class_scale: Optional[torch.Tensor] = None  # multiplies the logits first (VS: (n_c / n_max)^gamma)
    margins: Optional[torch.Tensor] = None  # LDAM: subtracted from the true-class logit, then scaled
    scale: float = 1.0
    class_weight: Optional[torch.Tensor] = None  # class-balanced / DRW weight w_y
    gamma: float = 0.0  # focal exponent; 0 is cross-entropy
    smoothing: Optional[torch.Tensor] = None  # LAS: label smoothing epsilon_y of each class


def _float(value, name: str, who: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LossError(f"{who}: {name} must be a finite number, got {value!r}")
    return float(value)


def make_base_spec(name: str, class_counts: Optional[CountsLike] = None, **options) -> BaseSpec:
    """Build the :class:`BaseSpec` of base loss ``name`` from the training class counts and its options.

    >>> make_base_spec("la", [100, 10], tau=1.0).shift.tolist()  # doctest: +ELLIPSIS
    [-0.0953..., -2.3978...]
    """
    if name not in BASE_OPTIONS:
        raise LossError(f"unknown base loss {name!r}; valid: {', '.join(BASES)}")
    valid = BASE_OPTIONS[name]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(valid) if valid else "none"
        raise LossError(f"{name}: unknown option(s) {', '.join(unknown)}; options of {name!r}: {listing}")
    opts = {**valid, **options}
    counts = None
    if class_counts is not None or name in _NEEDS_POSITIVE:
        counts = as_counts(class_counts, positive=name in _NEEDS_POSITIVE, who=name)
    spec = BaseSpec(name=name)
    if name == "focal":
        spec.gamma = _float(opts["gamma"], "gamma", name)
    elif name in ("cb", "cb-focal"):
        form = "focal" if name == "cb-focal" else opts["form"]
        if form not in ("ce", "focal"):
            raise LossError(f"cb: form must be 'ce' or 'focal', got {form!r}")
        spec.class_weight = class_balanced_weights(counts, _float(opts["beta"], "beta", name))
        spec.gamma = _float(opts["gamma"], "gamma", name) if form == "focal" else 0.0
    elif name == "ldam":
        spec.margins = ldam_margins(counts, _float(opts["max_margin"], "max_margin", name))
        spec.scale = _float(opts["scale"], "scale", name)
    elif name == "la":
        spec.shift = _float(opts["tau"], "tau", name) * torch.log(counts / counts.sum())
    elif name == "bs":
        spec.shift = torch.log(counts)
    elif name == "las":
        spec.smoothing = label_aware_smoothing(counts, _float(opts["smooth_head"], "smooth_head", name),
                                               _float(opts["smooth_tail"], "smooth_tail", name), opts["smooth_shape"])
    elif name == "vs":
        gamma = _float(opts["gamma"], "gamma", name)
        if gamma < 0:
            raise LossError(f"vs: gamma must be >= 0, got {gamma}")
        spec.class_scale = (counts / counts.max()) ** gamma
        spec.shift = _float(opts["tau"], "tau", name) * torch.log(counts / counts.sum())
    if spec.gamma < 0:
        raise LossError(f"{name}: gamma must be >= 0, got {spec.gamma}")
    return spec


def label_aware_smoothing(counts: torch.Tensor, head: float = 0.4, tail: float = 0.1, shape: str = "concave"
                          ) -> torch.Tensor:
    """MiSLAS's label-aware smoothing factors (Zhong et al., CVPR 2021, eq. 5): ε_y = ε_tail + (ε_head − ε_tail)·g(t),
    t = (n_y − n_min) / (n_max − n_min), g(t) = sin(πt/2) (concave), t (linear) or 1 − cos(πt/2) (convex): the
    head is smoothed most. The target of a sample of class y is 1 − ε_y on y and ε_y / (C − 1) on each other class.

    >>> [round(v, 4) for v in label_aware_smoothing(torch.tensor([100.0, 55, 10]), 0.4, 0.1).tolist()]
    [0.4, 0.3121, 0.1]
    """
    if shape not in LAS_SHAPES:
        raise LossError(f"las: smooth_shape must be one of {', '.join(LAS_SHAPES)}, got {shape!r}")
    for value, what in ((head, "smooth_head"), (tail, "smooth_tail")):
        if not 0 <= value < 1:
            raise LossError(f"las: {what} must be in [0, 1), got {value}")
    span = counts.max() - counts.min()
    t = (counts - counts.min()) / span if span > 0 else torch.ones_like(counts)
    g = {"concave": torch.sin(math.pi * t / 2), "linear": t, "convex": 1 - torch.cos(math.pi * t / 2)}[shape]
    return tail + (head - tail) * g


def _to_float(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def adjusted_logits(logits: torch.Tensor, targets: torch.Tensor, spec: BaseSpec) -> torch.Tensor:
    """The logits z the base loss feeds to its softmax (float32): VS scale, LA/BS/VS shift, LDAM margin and scale."""
    z = _to_float(logits)
    if spec.class_scale is not None:
        z = z * spec.class_scale.to(z.device, z.dtype)
    if spec.shift is not None:
        z = z + spec.shift.to(z.device, z.dtype)
    if spec.margins is not None:
        margin = spec.margins.to(z.device, z.dtype)[targets].unsqueeze(1)
        z = torch.scatter_add(z, 1, targets.unsqueeze(1), -margin) * spec.scale
    return z


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise LossError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _per_sample_base(z: torch.Tensor, targets: torch.Tensor, spec: BaseSpec, log_pt: torch.Tensor) -> torch.Tensor:
    if spec.gamma:
        # (1 - p)^gamma with 1 - p = -expm1(log p), exact near p = 1; the clamp keeps gamma < 1 finite there.
        loss = -(-torch.expm1(log_pt)).clamp_min(_TINY).pow(spec.gamma) * log_pt
    else:
        loss = -log_pt
    if spec.smoothing is not None:  # LAS: -(1 - ε) log p_y - ε/(C-1) Σ_{c≠y} log p_c
        eps = spec.smoothing.to(z.device, z.dtype)[targets]
        others = torch.log_softmax(z, dim=1).sum(1) - log_pt
        loss = (1 - eps) * loss - eps / (z.shape[1] - 1) * others
    if spec.class_weight is not None:
        loss = loss * spec.class_weight.to(z.device, z.dtype)[targets]
    return loss


def base_loss(
    logits: torch.Tensor, targets: torch.Tensor, spec: BaseSpec, reduction: str = "mean", check: bool = True
) -> torch.Tensor:
    """Apply base loss ``spec`` to a batch. ``reduction="mean"`` is the plain batch mean, also for weighted losses."""
    _check_reduction(reduction)
    if check:
        check_targets(logits, targets, spec.name)
        for table in (spec.class_scale, spec.shift, spec.margins, spec.class_weight, spec.smoothing):
            if table is not None:
                check_num_classes(table, logits, spec.name)
    z = adjusted_logits(logits, targets, spec)
    if not spec.gamma and spec.class_weight is None and spec.smoothing is None:
        return F.cross_entropy(z, targets, reduction=reduction)
    log_pt = torch.log_softmax(z, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return _reduce(_per_sample_base(z, targets, spec, log_pt), reduction)


# --- public base losses ------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (float32 math).

    >>> cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])).item()  # doctest: +ELLIPSIS
    1.386...
    """
    return base_loss(logits, targets, make_base_spec("ce"), reduction)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Multi-class softmax focal loss -(1 - p_t)^gamma log p_t; gamma = 0 is cross-entropy.

    >>> round(focal_loss(torch.zeros(1, 2), torch.tensor([0]), gamma=1.0).item(), 4)  # 0.5 * log 2
    0.3466
    """
    return base_loss(logits, targets, make_base_spec("focal", gamma=gamma), reduction)


def class_balanced_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: CountsLike,
    beta: float = 0.9999,
    form: str = "ce",
    gamma: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Class-balanced loss (Cui et al. 2019) over CE (``form="ce"``) or focal (``form="focal"``, uses ``gamma``).

    ``reduction="mean"`` is the plain batch mean of w_y * loss_i (the paper's convention).

    >>> x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    >>> torch.allclose(class_balanced_loss(x, y, [100, 10], beta=0.0), cross_entropy(x, y))
    True
    """
    spec = make_base_spec("cb", class_counts, beta=beta, form=form, gamma=gamma)
    return base_loss(logits, targets, spec, reduction)


def ldam_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: CountsLike,
    max_margin: float = 0.5,
    scale: float = 30.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """LDAM (Cao et al. 2019): CE on scale * (z - m_y onehot), m_c proportional to n_c^(-1/4), max ``max_margin``.

    Meant for cosine logits in [-1, 1] (see :class:`ccar.models.NormedLinear`).

    >>> ldam_loss(torch.zeros(1, 2), torch.tensor([1]), [100, 1]).item() > ldam_loss(torch.zeros(1, 2), torch.tensor([0]), [100, 1]).item()
    True
    """
    spec = make_base_spec("ldam", class_counts, max_margin=max_margin, scale=scale)
    return base_loss(logits, targets, spec, reduction)


def logit_adjusted_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: CountsLike, tau: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Logit-adjusted loss (Menon et al. 2021): CE on z + tau * log(prior).

    >>> logit_adjusted_loss(torch.zeros(1, 2), torch.tensor([1]), [90, 10]).item()  # -log 0.1
    2.302585...
    """
    spec = make_base_spec("la", class_counts, tau=tau)
    return base_loss(logits, targets, spec, reduction)


def balanced_softmax_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: CountsLike, reduction: str = "mean"
) -> torch.Tensor:
    """Balanced Softmax (Ren et al. 2020): CE on z + log(n); equal to :func:`logit_adjusted_loss` with tau = 1.

    >>> x, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    >>> torch.allclose(balanced_softmax_loss(x, y, [90, 10]), logit_adjusted_loss(x, y, [90, 10]))
    True
    """
    return base_loss(logits, targets, make_base_spec("bs", class_counts), reduction)


def vs_loss(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: CountsLike, gamma: float = 0.2, tau: float = 1.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Vector-scaling loss (Kini et al. 2021): CE on z_c * (n_c / n_max)^gamma + tau * log(prior_c).

    gamma = 0 is the logit-adjusted loss with ``tau``; the defaults are the paper's CIFAR setting.

    >>> x, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    >>> torch.allclose(vs_loss(x, y, [90, 10], gamma=0.0, tau=1.0), logit_adjusted_loss(x, y, [90, 10]))
    True
    """
    return base_loss(logits, targets, make_base_spec("vs", class_counts, gamma=gamma, tau=tau), reduction)


def posthoc_logit_adjustment(logits: torch.Tensor, class_counts: CountsLike, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment at inference: z - tau * log(prior); moves predictions toward tail classes.

    >>> posthoc_logit_adjustment(torch.zeros(1, 2), [90, 10]).argmax(1).item()
    1
    """
    counts = as_counts(class_counts, positive=True, who="posthoc_logit_adjustment")
    check_num_classes(counts, logits, "posthoc_logit_adjustment")
    z = _to_float(logits)
    return z - _float(tau, "tau", "posthoc") * torch.log(counts / counts.sum()).to(z.device, z.dtype)


# --- CCAR ----------------------------------------------------------------------------------------------------------


def omega_weight(p_t: torch.Tensor, f_c, omega: float = 0.75, base: float = math.e) -> torch.Tensor:
    """The CCAR weight Omega(p_t, f_c) = (base - f')^(omega - p_t), f' = f_c below the pivot, 1 - f_c at or above.

    Elementwise; ``f_c`` broadcasts against ``p_t``. Gradients flow through ``p_t``.

    >>> omega_weight(torch.tensor([0.01, 0.75, 0.999]), 0.01).tolist()  # doctest: +ELLIPSIS
    [2.0902..., 1.0, 0.8726...]
    """
    check_omega(omega, base)
    p_t = torch.as_tensor(p_t)
    p_t = p_t.float() if not p_t.is_floating_point() or p_t.dtype in (torch.float16, torch.bfloat16) else p_t
    f_c = torch.as_tensor(f_c, dtype=p_t.dtype, device=p_t.device)
    f_prime = torch.where(p_t < omega, f_c, 1.0 - f_c)
    return torch.pow(base - f_prime, omega - p_t)


@dataclass
class CCARTables:
    """Per-class strength * log(base - f') for both branches: row 0 below the pivot (f' = f_c), row 1 at or above
    it (f' = 1 - f_c). Omega^strength = exp((omega - p_t) * log_base[branch, y])."""

    log_base: torch.Tensor  # (2, C)

    @property
    def log_explore(self) -> torch.Tensor:
        return self.log_base[0]

    @property
    def log_consolidate(self) -> torch.Tensor:
        return self.log_base[1]


def ccar_tables(counts: torch.Tensor, frequency: str = "sum", power_base: float = math.e, strength: float = 1.0) -> CCARTables:
    freq = class_frequency(counts, frequency)
    strength = _float(strength, "strength", "ccar")
    return CCARTables(strength * torch.log(torch.stack([power_base - freq, power_base - 1.0 + freq])))


class _FusedCCAR(torch.autograd.Function):
    """Omega * w_y * focal/CE on adjusted logits z as one autograd node with a hand-written backward.

    Every per-sample loss is a function h(s) of s = log p_t alone, and ds/dz = onehot - softmax(z), so the gradient
    is h'(s) * (onehot - softmax): cross-entropy's own gradient scaled per sample. The forward saves log_softmax and
    the per-sample factor h'(s); the backward is log_softmax's own (as in cross-entropy's backward).

    Written in the ``setup_context`` style with ``generate_vmap_rule = True``: ``torch.compile(fullgraph=True)``
    traces through it without a graph break, and ``torch.func.vmap`` / ``functional_call`` over a stack of models
    (many small runs trained as one program) batch it like any other op.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z, targets, weight_y, log_explore_y, log_consolidate_y, omega, gamma, detach, reduction):
        log_probs = torch.log_softmax(z, dim=-1)
        s = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        p = s.exp()
        log_b = torch.where(p < omega, log_explore_y, log_consolidate_y)
        weight = torch.exp((omega - p) * log_b)  # Omega^strength
        if weight_y is not None:
            weight = weight * weight_y
        if gamma:
            q = (-torch.expm1(s)).clamp_min(_TINY)
            q_gamma = q.pow(gamma)
            g = -q_gamma * s
            g_prime = gamma * (q_gamma / q) * p * s - q_gamma  # d g / d s
        else:
            g = -s
            g_prime = -1.0
        loss = weight * g
        # dOmega/ds = -log_b * Omega * p, so d(Omega g)/ds = Omega (g' - log_b p g).
        dloss_ds = weight * g_prime if detach else weight * (g_prime - log_b * p * g)
        return _reduce(loss, reduction), log_probs, dloss_ds

    @staticmethod
    def setup_context(ctx, inputs, output):
        targets, reduction = inputs[1], inputs[8]
        _, log_probs, dloss_ds = output
        ctx.save_for_backward(log_probs, targets, dloss_ds)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(log_probs, dloss_ds)
        ctx.set_materialize_grads(False)  # no zero-filled (batch, classes) gradient for the unused outputs

    @staticmethod
    def backward(ctx, grad_out, _grad_log_probs, _grad_dloss_ds):
        log_probs, targets, dloss_ds = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None, None, None, None
        k = dloss_ds * grad_out
        if ctx.reduction == "mean":
            k = k / dloss_ds.shape[-1]
        # d loss / d log_probs is k at the targets and 0 elsewhere: nll_loss's backward (reduction none) writes exactly
        # that, and log_softmax's backward turns it into k * (onehot - softmax(z)) -- cross-entropy's own backward
        # pair, which torch.compile traces and torch.func.vmap batches.
        grad_log_probs = torch.ops.aten.nll_loss_backward(-k, log_probs, targets, None, 0, -100, k.new_ones(()))
        grad = torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, log_probs.dtype)
        return grad, None, None, None, None, None, None, None, None


NORMALIZE = (None, "batch")


def ccar_from_spec(
    logits: torch.Tensor,
    targets: torch.Tensor,
    spec: BaseSpec,
    tables: CCARTables,
    omega: float = 0.75,
    detach_weight: bool = False,
    normalize: Optional[str] = None,
    reduction: str = "mean",
    check: bool = True,
) -> torch.Tensor:
    """CCAR over a prepared base loss; the modules call this with tables cached on the device.

    One code path on every device: the autograd function above, or, for ``normalize="batch"`` (whose weights
    couple the samples) and for LAS (whose loss depends on every class's probability, not on p_t alone), composed
    autograd ops.
    """
    _check_reduction(reduction)
    if normalize not in NORMALIZE:
        raise LossError(f"ccar: normalize must be None or 'batch', got {normalize!r}")
    if check:
        check_targets(logits, targets, "ccar")
        check_num_classes(tables.log_explore, logits, "ccar")
    z = adjusted_logits(logits, targets, spec)
    log_explore, log_consolidate = tables.log_base.to(z.device, z.dtype)[:, targets]  # one gather for both rows
    weight_y = None if spec.class_weight is None else spec.class_weight.to(z.device, z.dtype)[targets]
    omega = float(omega)
    if normalize is None and spec.smoothing is None:
        loss, _, _ = _FusedCCAR.apply(
            z, targets, weight_y, log_explore, log_consolidate, omega, spec.gamma, bool(detach_weight), reduction
        )
        return loss
    log_pt = torch.log_softmax(z, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    p_t = log_pt.exp()
    weight = torch.exp((omega - p_t) * torch.where(p_t < omega, log_explore, log_consolidate))
    if detach_weight:
        weight = weight.detach()
    if normalize == "batch":
        weight = weight / weight.mean()
    return _reduce(weight * _per_sample_base(z, targets, spec, log_pt), reduction)


def ccar_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: CountsLike,
    base: str = "ce",
    *,
    omega: float = 0.75,
    power_base: float = math.e,
    detach_weight: bool = False,
    normalize: Optional[str] = None,
    frequency: str = "sum",
    strength: float = 1.0,
    reduction: str = "mean",
    **base_options,
) -> torch.Tensor:
    """Class-Confidence Aware Reweighting over base loss ``base``: mean_i Omega(p_t, f_c)_i * base_loss_i.

    p_t is the true-class probability of the base loss's adjusted logits, f_c = n_y / sum(n).
    ``detach_weight=False`` (default, as in the first author's notebook) lets gradients flow through Omega;
    ``normalize="batch"`` divides by the batch mean of Omega; ``frequency="max"`` (an extension, not the paper)
    uses n_y / max(n); ``strength`` raises Omega to a power (0 disables CCAR, 1 is the paper).

    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 2])
    >>> ccar_loss(x, y, [100, 10, 1], base="ce") > cross_entropy(x, y)  # p_t = 1/3 < 0.75: up-weighted
    tensor(True)
    """
    check_omega(omega, power_base)
    counts = as_counts(class_counts, positive=base in _NEEDS_POSITIVE, who="ccar")
    spec = make_base_spec(base, counts, **base_options)
    tables = ccar_tables(counts, frequency, power_base, strength)
    return ccar_from_spec(logits, targets, spec, tables, omega, detach_weight, normalize, reduction)
