"""Multi-expert losses: RIDE (Wang et al., ICLR 2021) and SADE (Zhang et al., NeurIPS 2022), and CCAR over them.

A multi-expert model returns, in training, ``{"logits": (B, C) mean of the experts' logits, "experts": (E, B, C)}``.
Each expert is trained with its own distribution-aware classification loss; CCAR (``ccar=True``) multiplies each
expert's per-sample classification loss by Omega(p_t, f_y), p_t taken from that expert's own *adjusted* logits (the z
its softmax sees: LDAM's s(z - m_y) for RIDE, z + shift_e for SADE). RIDE's diversity term is not weighted.

This module also holds what the family losses share (:class:`FamilyLoss`, :class:`CCARWeighting`,
:func:`classification_loss`); :mod:`ccar.losses.contrastive` builds on them. Pure functions hold the math; the
modules keep the per-class tables as buffers and the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LossError
from . import functional as LF
from .stats import CountsLike, as_counts, check_omega, check_targets, class_balanced_weights, ldam_margins

CCAR_DEFAULTS = {"omega": 0.75, "power_base": math.e, "detach_weight": False, "normalize": None, "frequency": "sum",
                 "strength": 1.0}


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --- shared by the family losses ---------------------------------------------------------------------------------


@dataclass
class CCARWeighting:
    """CCAR's weight over a classification term: per-class ``log_base`` (2, C) from :func:`ccar.losses.functional.
    ccar_tables` (strength included), the pivot, whether Omega is a constant, and the optional batch normalisation."""

    log_base: torch.Tensor
    omega: float = 0.75
    detach_weight: bool = False
    normalize: Optional[str] = None

    def weight(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Omega(p_t, f_y) per row, p_t = softmax(z)_y of the adjusted logits ``z`` (float32).

        >>> w = CCARWeighting(LF.ccar_tables(torch.tensor([3.0, 1.0])).log_base.float())
        >>> round(w.weight(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])).item(), 6)  # p_t = 0.75
        1.0
        """
        z = _f32(z)
        p_t = torch.log_softmax(z, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1).exp()
        explore, consolidate = self.log_base.to(z.device, z.dtype)[:, targets]
        weight = torch.exp((self.omega - p_t) * torch.where(p_t < self.omega, explore, consolidate))
        if self.detach_weight:
            weight = weight.detach()
        return weight / weight.mean() if self.normalize == "batch" else weight


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, spec: LF.BaseSpec,
                        ccar: Optional[CCARWeighting] = None) -> torch.Tensor:
    """Per-sample base loss ``spec`` (float32), times Omega when ``ccar`` is given; labels are not re-checked.

    >>> x, y = torch.zeros(2, 3), torch.tensor([0, 2])
    >>> classification_loss(x, y, LF.make_base_spec("ce")).tolist()  # doctest: +ELLIPSIS
    [1.0986..., 1.0986...]
    """
    if ccar is None:
        return LF.base_loss(logits, targets, spec, "none", check=False)
    return LF.ccar_from_spec(logits, targets, spec, LF.CCARTables(ccar.log_base), ccar.omega, ccar.detach_weight,
                             ccar.normalize, "none", check=False)


def _number(value, name: str, who: str, low: Optional[float] = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LossError(f"{who}: {name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise LossError(f"{who}: {name} must be {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


class FamilyLoss(nn.Module):
    """Base of the losses over a model's dict of outputs: called ``loss_fn(outputs, targets)``, per-sample losses
    (B,) for ``reduction="none"``. Holds the class counts' log prior, CCAR's tables (``ccar=True``), the epoch and
    ``validate`` (range-check the labels on every call, one host sync; off for trainers that checked them)."""

    takes_outputs = True
    name = "family"
    OPTIONS: tuple = ()
    CCAR = True  # whether CCAR can weight this loss (its options are then valid too)

    def __init__(self, class_counts: CountsLike, reduction: str, ccar: bool, ccar_options: Dict[str, object],
                 unknown: Dict[str, object]):
        super().__init__()
        if unknown:
            valid = ", ".join(self.OPTIONS + ("reduction",) + (("ccar",) + tuple(CCAR_DEFAULTS) if self.CCAR else ()))
            raise LossError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))}; options of "
                            f"{self.name!r}: {valid}")
        LF._check_reduction(reduction)
        if not isinstance(ccar, bool):
            raise LossError(f"{self.name}: ccar must be true or false, got {ccar!r}")
        counts = as_counts(class_counts, positive=True, who=self.name)
        self.num_classes, self.reduction, self.ccar = len(counts), reduction, ccar
        given = {k: v for k, v in ccar_options.items() if v is not None}
        if given and not ccar:
            raise LossError(f"{self.name}: {', '.join(sorted(given))} are options of CCAR; use loss.name=ccar "
                            f"loss.base={self.name} (or ccar=True)")
        self.ccar_options = {**CCAR_DEFAULTS, **given} if ccar else {}
        log_base = None
        if ccar:
            opts = self.ccar_options
            check_omega(opts["omega"], opts["power_base"])
            if opts["normalize"] not in LF.NORMALIZE:
                raise LossError(f"ccar: normalize must be None or 'batch', got {opts['normalize']!r}")
            log_base = LF.ccar_tables(counts, opts["frequency"], float(opts["power_base"]), opts["strength"]).log_base
        self.register_buffer("log_base", None if log_base is None else log_base.float(), persistent=False)
        self.register_buffer("log_prior", torch.log(counts / counts.sum()).float(), persistent=False)
        self.counts = counts  # (float64, CPU: for the tables subclasses build)
        self.epoch = 0
        self.validate = True

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current (0-based) epoch (DRW-style schedules switch on it)."""
        self.epoch = int(epoch)

    @property
    def drw_active(self) -> bool:
        return False

    def weighting(self) -> Optional[CCARWeighting]:
        if not self.ccar:
            return None
        o = self.ccar_options
        return CCARWeighting(self.log_base, float(o["omega"]), bool(o["detach_weight"]), o["normalize"])

    def _output(self, outputs, key: str, what: str) -> torch.Tensor:
        if not isinstance(outputs, dict):
            raise LossError(f"{self.name}: takes the model's dict of training outputs, got a {type(outputs).__name__}; "
                            f"train it with a model built for loss {self.name} (ccar.models.families)")
        if key not in outputs:
            raise LossError(f"{self.name}: outputs has no {key!r} ({what}); got keys {', '.join(sorted(outputs))}")
        return outputs[key]

    def _check_logits(self, logits: torch.Tensor, rows: int, what: str = "logits") -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or logits.shape[0] != rows:
            raise LossError(f"{self.name}: {what} must have shape ({rows}, {self.num_classes}) "
                            f"(len(class_counts) = {self.num_classes}), got {tuple(logits.shape)}")

    def _check_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Shape and dtype of the labels; their range too (one host sync) while ``validate``."""
        check_targets(logits[: targets.shape[0]], targets, self.name, values=self.validate)

    def _reduce(self, loss: torch.Tensor) -> torch.Tensor:
        LF._check_reduction(self.reduction)  # (the engine sets reduction after construction)
        return LF._reduce(loss, self.reduction)

    def _repr_options(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.OPTIONS)

    def extra_repr(self) -> str:
        parts = [f"classes={self.num_classes}", self._repr_options()]
        parts.append(f"ccar={self.ccar}")
        if self.ccar:
            parts.append(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v!r}"
                                   for k, v in self.ccar_options.items()))
        return ", ".join(p for p in parts + [f"reduction={self.reduction!r}"] if p)


# --- RIDE ---------------------------------------------------------------------------------------------------------


def ride_class_temperatures(class_counts: CountsLike, base_temperature: float = 1.0,
                            reweight_factor: float = 0.05) -> torch.Tensor:
    """RIDE's per-class diversity temperatures after the DRW epoch: ``base * w_c / max w``,
    ``w_c = C * prior_c * reweight_factor + 1 - reweight_factor`` (frequent classes are the warmest).

    >>> [round(t, 5) for t in ride_class_temperatures([4, 2, 1]).tolist()]
    [1.0, 0.95862, 0.93793]
    """
    counts = as_counts(class_counts, positive=True, who="ride")
    factor = _number(reweight_factor, "reweight_factor", "ride")
    weights = len(counts) * counts / counts.sum() * factor + 1.0 - factor
    if not bool((weights > 0).all()):
        raise LossError(f"ride: reweight_factor {reweight_factor} is too large (a class temperature would be <= 0)")
    return _number(base_temperature, "base_temperature", "ride", 0.0, strict=True) * weights / weights.max()


def ride_diversity(expert_logits: torch.Tensor, ensemble_logits: torch.Tensor,
                   temperature: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """RIDE's diversity term per sample: ``mean(T)^2 * KL(softmax(ensemble / T) || softmax(expert / T))``.

    The ensemble's distribution is a constant (detached; RIDE computes it under ``no_grad``); ``temperature`` is a
    number or per-class temperatures (C,), whose mean scales the KL (RIDE's ``temperature_mean``). RIDE adds
    ``diversity_weight`` (negative: the KL is maximised) times this, summed over the experts.

    >>> e, m = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    >>> round(ride_diversity(e, m).item(), 6)  # 0.5 log(0.5/p) + 0.5 log(0.5/(1-p)), p = softmax(2, 0)_0
    0.433781
    """
    z = _f32(expert_logits)
    ensemble = _f32(ensemble_logits).detach()
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(z.device, z.dtype)
        t_mean = temperature.mean()
    else:
        t_mean = float(temperature)
    log_p = torch.log_softmax(ensemble / temperature, dim=1)
    log_q = torch.log_softmax(z / temperature, dim=1)
    return t_mean * t_mean * (log_p.exp() * (log_p - log_q)).sum(1)


def ride_loss(experts: torch.Tensor, ensemble: torch.Tensor, targets: torch.Tensor, margins: torch.Tensor, *,
              scale: float = 30.0, class_weight: Optional[torch.Tensor] = None, diversity_weight: float = -0.2,
              temperature: Union[float, torch.Tensor] = 1.0, ccar: Optional[CCARWeighting] = None) -> torch.Tensor:
    """RIDE's loss per sample: sum over experts e of ``LDAM_e + diversity_weight * ride_diversity(s z_e, s z_ens, T)``.

    LDAM_e is ``w_y * CE(s (z_e - m_y onehot), y)`` (``class_weight`` w: DRW's, or None), times Omega of p_t on those
    adjusted logits when ``ccar`` is given. The diversity compares the scaled logits ``s z`` (RIDE's model multiplies
    its cosine logits by s before both terms; the margin is not part of it). ``experts`` (E, B, C), ``ensemble``
    (B, C): the experts' mean.

    >>> z = torch.zeros(2, 1, 2)
    >>> ride_loss(z, z.mean(0), torch.tensor([0]), torch.tensor([0.0, 0.0]), scale=1.0).tolist()  # 2 * log 2
    [1.3862943649291992]
    """
    spec = LF.BaseSpec("ride", margins=margins, scale=float(scale), class_weight=class_weight)
    total = None
    for z in experts.unbind(0):
        loss = classification_loss(z, targets, spec, ccar)
        if diversity_weight:
            loss = loss + diversity_weight * ride_diversity(scale * _f32(z), scale * _f32(ensemble), temperature)
        total = loss if total is None else total + loss
    return total


class RIDELoss(FamilyLoss):
    """RIDE (Wang et al., ICLR 2021): every expert's LDAM-DRW loss plus the (negatively weighted) diversity KL.

    Options (defaults from RIDE's ``RIDELoss``): ``max_margin`` 0.5 and ``scale`` 30 (LDAM's), ``diversity_weight``
    -0.2 (``additional_diversity_factor``; RIDE's CIFAR-100 config uses -0.45), ``base_temperature`` 1.0,
    ``reweight_factor`` 0.05 (class temperatures after DRW; ImageNet-LT 0.02), ``drw_epoch`` None (RIDE's CIFAR
    recipe: 160 of 200; from that 0-based epoch on the classification terms take class-balanced weights with
    ``drw_beta`` 0.9999 and the diversity takes :func:`ride_class_temperatures`), and CCAR's (``ccar=True``: Omega
    over each expert's LDAM-DRW term, p_t from that expert's s(z - m_y)).

    Departures from RIDE's code, on purpose: the DRW-weighted terms are the plain batch mean of w_y * loss_i (this
    library's convention, method.md section 2), not PyTorch's sum(w * loss) / sum(w); each expert's loss is always on
    its own logits (RIDE uses the ensemble's when diversity_weight is 0).

    >>> loss_fn = RIDELoss([100, 10, 1], reduction="none")
    >>> out = {"experts": torch.zeros(3, 2, 3), "logits": torch.zeros(2, 3)}
    >>> loss_fn(out, torch.tensor([0, 2])).shape
    torch.Size([2])
    """

    name = "ride"
    OPTIONS = ("max_margin", "scale", "diversity_weight", "base_temperature", "reweight_factor", "drw_epoch",
               "drw_beta")

    def __init__(self, class_counts: CountsLike, reduction: str = "mean", *, max_margin: float = 0.5,
                 scale: float = 30.0, diversity_weight: float = -0.2, base_temperature: float = 1.0,
                 reweight_factor: float = 0.05, drw_epoch: Optional[int] = None, drw_beta: float = 0.9999,
                 ccar: bool = False, omega=None, power_base=None, detach_weight=None, normalize=None, frequency=None,
                 strength=None, **unknown):
        super().__init__(class_counts, reduction, ccar, dict(omega=omega, power_base=power_base,
                                                             detach_weight=detach_weight, normalize=normalize,
                                                             frequency=frequency, strength=strength), unknown)
        self.max_margin = _number(max_margin, "max_margin", self.name, 0.0)
        self.scale = _number(scale, "scale", self.name, 0.0, strict=True)
        self.diversity_weight = _number(diversity_weight, "diversity_weight", self.name)
        self.base_temperature = _number(base_temperature, "base_temperature", self.name, 0.0, strict=True)
        self.reweight_factor = _number(reweight_factor, "reweight_factor", self.name)
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise LossError(f"ride: drw_epoch must be a non-negative integer epoch, got {drw_epoch!r}")
        self.drw_epoch, self.drw_beta = drw_epoch, drw_beta
        self.register_buffer("margins", ldam_margins(self.counts, self.max_margin).float(), persistent=False)
        self.register_buffer("drw_weight", class_balanced_weights(self.counts, drw_beta).float(), persistent=False)
        temperatures = ride_class_temperatures(self.counts, self.base_temperature, self.reweight_factor)
        self.register_buffer("class_temperature", temperatures.float(), persistent=False)

    @property
    def drw_active(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        experts = self._output(outputs, "experts", "each expert's logits, (E, B, C)")
        ensemble = outputs.get("logits")
        ensemble = experts.mean(0) if ensemble is None else ensemble
        if experts.ndim != 3 or experts.shape[0] < 1:
            raise LossError(f"ride: outputs['experts'] must have shape (experts, batch, classes), got "
                            f"{tuple(experts.shape)}")
        self._check_targets(experts[0], targets)
        self._check_logits(experts[0], targets.shape[0], "each expert's logits")
        self._check_logits(ensemble, targets.shape[0], "outputs['logits'] (the ensemble)")
        active = self.drw_active
        loss = ride_loss(experts, ensemble, targets, self.margins, scale=self.scale,
                         class_weight=self.drw_weight if active else None, diversity_weight=self.diversity_weight,
                         temperature=self.class_temperature if active else self.base_temperature,
                         ccar=self.weighting())
        return self._reduce(loss)


# --- SADE ---------------------------------------------------------------------------------------------------------


def inverse_prior(prior: torch.Tensor) -> torch.Tensor:
    """SADE's inversed prior: the prior's values in reversed rank order (the most frequent class takes the smallest
    value, the second most frequent the second smallest, ...), a long tail running the other way.

    >>> inverse_prior(torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)).tolist()
    [0.3, 0.1, 0.6]
    """
    values, order = torch.sort(prior, stable=True)
    rank = torch.argsort(order)
    return values[prior.shape[0] - 1 - rank]


def sade_shifts(log_prior: torch.Tensor, inverse_lambda: float = 2.0) -> torch.Tensor:
    """The additive logit adjustment of SADE's three experts, (3, C): 0 (softmax CE: the long-tailed training prior),
    log prior (Balanced Softmax: uniform), log prior - lambda log inverse_prior (inverse softmax: a reversed tail).

    >>> [round(v, 4) for v in sade_shifts(torch.tensor([0.6, 0.3, 0.1]).log())[2].tolist()]  # log .6 - 2 log .1, ...
    [4.0943, 1.204, -1.2809]
    """
    log_inverse = torch.log(inverse_prior(log_prior.exp()))
    return torch.stack([torch.zeros_like(log_prior), log_prior, log_prior - inverse_lambda * log_inverse])


def _check_three(experts: torch.Tensor) -> None:
    if experts.ndim != 3 or experts.shape[0] != 3:
        raise LossError(f"sade: needs exactly 3 experts (long-tailed, uniform, inverse), got outputs['experts'] of "
                        f"shape {tuple(experts.shape)}; set model.experts=3")


def sade_loss(experts: torch.Tensor, targets: torch.Tensor, shifts: torch.Tensor,
              ccar: Optional[CCARWeighting] = None) -> torch.Tensor:
    """SADE's training loss per sample: sum over its three experts of CE(z_e + shift_e, y), each times Omega of its
    own p_t = softmax(z_e + shift_e)_y when ``ccar`` is given. ``experts`` (3, B, C), ``shifts`` (3, C).

    >>> sade_loss(torch.zeros(3, 1, 2), torch.tensor([0]), torch.zeros(3, 2)).tolist()  # 3 * log 2
    [2.079441547393799]
    """
    _check_three(experts)
    total = None
    for e in range(3):
        spec = LF.BaseSpec(f"sade expert {e + 1}", shift=shifts[e] if e else None)
        loss = classification_loss(experts[e], targets, spec, ccar)
        total = loss if total is None else total + loss
    return total


class SADELoss(FamilyLoss):
    """SADE (Zhang et al., NeurIPS 2022): three skill-diverse experts, trained with softmax CE, Balanced Softmax and
    the inverse softmax loss (``inverse_lambda`` 2, SADE's ``tau``); see :func:`sade_shifts`. With ``ccar=True``
    each expert's term is multiplied by Omega of its own adjusted p_t. Test-time aggregation:
    :func:`fit_expert_weights`.

    >>> loss_fn = SADELoss([100, 10, 1])
    >>> round(loss_fn({"experts": torch.zeros(3, 2, 3)}, torch.tensor([0, 2])).item(), 4) > 0
    True
    """

    name = "sade"
    OPTIONS = ("inverse_lambda",)

    def __init__(self, class_counts: CountsLike, reduction: str = "mean", *, inverse_lambda: float = 2.0,
                 ccar: bool = False, omega=None, power_base=None, detach_weight=None, normalize=None, frequency=None,
                 strength=None, **unknown):
        super().__init__(class_counts, reduction, ccar, dict(omega=omega, power_base=power_base,
                                                             detach_weight=detach_weight, normalize=normalize,
                                                             frequency=frequency, strength=strength), unknown)
        self.inverse_lambda = _number(inverse_lambda, "inverse_lambda", self.name)
        log_prior = torch.log(self.counts / self.counts.sum())
        self.register_buffer("shifts", sade_shifts(log_prior, self.inverse_lambda).float(), persistent=False)

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        experts = self._output(outputs, "experts", "each expert's logits, (3, B, C)")
        _check_three(experts)
        self._check_targets(experts[0], targets)
        self._check_logits(experts[0], targets.shape[0], "each expert's logits")
        return self._reduce(sade_loss(experts, targets, self.shifts, self.weighting()))


# --- SADE's test-time self-supervised aggregation ------------------------------------------------------------------


def stability_loss(experts_view1: torch.Tensor, experts_view2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Negative prediction stability (SADE): ``-mean_n cos(softmax(sum_e w_e z1_en), softmax(sum_e w_e z2_en))``.

    As SADE's code: the experts' *logits* are aggregated with the weights as given (normalised by the caller:
    :func:`fit_expert_weights` passes softmax(theta)), then each view's aggregate goes through a softmax, and the
    two are compared by cosine similarity (eps 1e-6). Views (E, N, C), weights (E,).

    >>> z = torch.randn(3, 4, 5)
    >>> round(stability_loss(z, z, torch.full((3,), 1 / 3)).item(), 5)  # identical views: perfectly stable
    -1.0
    """
    w = _f32(weights)
    a = torch.softmax(torch.einsum("e,enc->nc", w, _f32(experts_view1)), dim=1)
    b = torch.softmax(torch.einsum("e,enc->nc", w, _f32(experts_view2)), dim=1)
    return -F.cosine_similarity(a, b, dim=1, eps=1e-6).mean()


def fit_expert_weights(experts_view1: torch.Tensor, experts_view2: torch.Tensor, *, epochs: int = 5,
                       batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                       min_weight: float = 0.05, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SADE's test-time self-supervised aggregation: expert weights (E,) learnt on unlabeled inputs.

    The weights are softmax(theta), theta initialised equal (1/E each, as SADE's 1/3); theta is trained to
    minimise :func:`stability_loss` over mini-batches of ``batch_size`` (shuffled with ``generator``, a CPU
    ``torch.Generator``: deterministic) by SGD with Nesterov momentum, for ``epochs`` passes, stopping after a pass
    in which a weight fell below ``min_weight`` (SADE's test-time config: 5 epochs, batch 128, lr 0.1, momentum 0.9,
    weight decay 5e-4, stop at 0.05). The experts' logits (E, N, C) of two augmented views of each input are
    constants here (the model is not trained).

    >>> z = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(0))
    >>> w = fit_expert_weights(z, z, generator=torch.Generator().manual_seed(0))
    >>> w.shape, round(w.sum().item(), 6)
    (torch.Size([3]), 1.0)
    """
    v1, v2 = _f32(experts_view1).detach(), _f32(experts_view2).detach()
    if v1.ndim != 3 or v1.shape != v2.shape:
        raise LossError(f"fit_expert_weights: the two views' expert logits must both be (experts, inputs, classes); "
                        f"got {tuple(v1.shape)} and {tuple(v2.shape)}")
    if int(epochs) < 0 or int(batch_size) < 1:
        raise LossError(f"fit_expert_weights: epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    n_experts, n = v1.shape[0], v1.shape[1]
    theta = torch.full((n_experts,), 1.0 / n_experts, device=v1.device, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    with torch.enable_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(n, generator=generator).to(v1.device)
            for start in range(0, n, int(batch_size)):
                idx = order[start: start + int(batch_size)]
                loss = stability_loss(v1[:, idx], v2[:, idx], torch.softmax(theta, dim=0))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if float(torch.softmax(theta.detach(), dim=0).min()) < min_weight:
                break
    return torch.softmax(theta.detach(), dim=0)
