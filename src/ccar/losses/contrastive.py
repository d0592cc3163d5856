"""Contrastive long-tail losses: PaCo / GPaCo (Cui et al., ICCV 2021; TPAMI 2023) and BCL (Zhu et al., CVPR 2022).

A contrastive model returns, in training, ``"logits"`` (V*B, C) and ``"features"`` (V*B, D, L2-normalised) of the
V >= 2 augmented views of each image, stacked view-major (rows 0..B-1 the first view); BCL's model adds
``"prototypes"`` (C, D), PaCo's momentum encoder ``"keys"`` (B, D, the second view's) and its queue ``"queue"``
(Q, D) with ``"queue_targets"`` (Q,; -1 marks an empty slot). Losses are per image (B,): the mean over its anchored
views. CCAR (``ccar=True``) weights the classification term only (see :func:`paco_loss` and :class:`BCLLoss`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import LossError
from . import functional as LF
from .experts import CCARWeighting, FamilyLoss, _f32, _number, classification_loss
from .stats import CountsLike


def paco_loss(logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor, *,
              keys: Optional[torch.Tensor] = None, queue: Optional[torch.Tensor] = None,
              queue_targets: Optional[torch.Tensor] = None, alpha: float = 0.01, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 0.05, ccar: Optional[CCARWeighting] = None) -> torch.Tensor:
    """Parametric contrastive loss per image (B,).

    For an anchor x_i with label y: one softmax over the C class centres, whose logits are the classifier's logits
    plus the log prior (``z_i + log prior``, as PaCo's code), and the contrast samples ``f_i . f_j / temperature``
    (the anchor itself excluded; their exponentials times ``gamma`` in the denominator). The positives are the
    anchor's class centre (weight ``beta``) and the same-class samples P(i) (weight ``alpha`` each)::

        loss_i = -(beta log p(c_y) + alpha sum_{j in P(i)} log p(j)) / (beta + alpha |P(i)|)

    With ``keys`` (PaCo): the anchors are the first view's rows (the query), contrasted with the first view's
    features of the batch, the momentum keys and the queue (PaCo's ``cat(q, k, queue)``). Without (GPaCo): every
    view's row is an anchor, contrasted with all V*B features (and the queue if given); the image's loss is the mean
    over its views. Queue slots with label -1 are neither positives nor in the denominator.

    CCAR: ``loss_i = (Omega_i beta (-log p(c_y)) + alpha sum_P (-log p(j))) / (beta + alpha |P(i)|)``, Omega of
    p_t = softmax(z_i + log prior)_y over the C centres alone -- the classifier's (logit-adjusted) confidence, the same
    p_t as CCAR over the LA loss. (The centre's probability within the joint softmax is not a class confidence: with
    hundreds of samples in the denominator it stays far below the pivot, and Omega would never leave exploration.)
    By hand, 1 image, 2 views with equal features, class counts (3, 1), logits (1, 0) in both views, y = 0,
    temperature 1, alpha = beta = gamma = 1. Each view anchors: centre logits 1 + log .75 and log .25, the other
    view's sample logit 1 (a positive); denominator .75e + .25 + e = 5.006993, log 1.610836; centre term
    1.610836 - 0.712318 = 0.898518, sample term 1.610836 - 1 = 0.610836, loss (0.898518 + 0.610836) / 2 = 0.754677.
    CCAR: p_t = .75e / (.75e + .25) = 0.890768 >= .75, so f' = 1 - .75 and Omega = (e - .25)^(.75 - .890768)
    = 0.880569; loss (0.880569 * 0.898518 + 0.610836) / 2 = 0.701021.

    >>> lp = torch.tensor([0.75, 0.25]).log()
    >>> z, f, y = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[1.0, 0.0]] * 2), torch.tensor([0])
    >>> round(paco_loss(z, f, y, lp, alpha=1.0, temperature=1.0).item(), 6)
    0.754677
    >>> from ccar.losses.functional import ccar_tables
    >>> w = CCARWeighting(ccar_tables(torch.tensor([3.0, 1.0])).log_base.float())
    >>> round(paco_loss(z, f, y, lp, alpha=1.0, temperature=1.0, ccar=w).item(), 6)
    0.701021
    """
    b = targets.shape[0]
    z, f = _f32(logits), _f32(features)
    if keys is not None:  # PaCo: the query view anchors; the bank is cat(q, k, queue)
        z, anchors, labels = z[:b], f[:b], targets
        bank, bank_labels = [anchors, _f32(keys).detach()], [targets, targets]
    else:  # GPaCo: every view anchors against every view
        anchors, labels = f, targets.repeat(f.shape[0] // b)
        bank, bank_labels = [f], [labels]
    n = anchors.shape[0]
    valid = torch.ones(sum(x.shape[0] for x in bank), dtype=torch.bool, device=f.device)
    if queue is not None and queue.shape[0]:
        bank.append(_f32(queue).detach())
        bank_labels.append(queue_targets)
        valid = torch.cat([valid, queue_targets >= 0])
    bank_all, bank_y = torch.cat(bank), torch.cat(bank_labels)
    not_self = torch.ones(n, bank_all.shape[0], dtype=torch.bool, device=f.device)
    not_self[:, :n].fill_diagonal_(False)
    contrast = not_self & valid.unsqueeze(0)
    positive = (contrast & (labels.unsqueeze(1) == bank_y.unsqueeze(0))).to(f.dtype)
    centres = z + log_prior.to(z.device, z.dtype)
    samples = anchors @ bank_all.T / temperature
    log_weight = torch.log(gamma * contrast.to(f.dtype))  # -inf: not in the denominator
    lse = torch.logsumexp(torch.cat([centres, samples + log_weight], dim=1), dim=1, keepdim=True)
    centre_term = beta * (lse.squeeze(1) - centres.gather(1, labels.unsqueeze(1)).squeeze(1))
    if ccar is not None:
        centre_term = ccar.weight(centres, labels) * centre_term
    sample_term = alpha * (positive * (lse - samples)).sum(1)
    loss = (centre_term + sample_term) / (beta + alpha * positive.sum(1))
    return loss.view(-1, b).mean(0)


def bcl_contrastive(features: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 0.07) -> torch.Tensor:
    """Balanced supervised contrastive loss per anchor (V*B,), BCL's eq. 6.

    Every view's row is an anchor; its contrast set is all other rows and every class prototype (class-complement).
    Class-averaging: in the denominator each class's exponentials are averaged over that class's members in the
    contrast set (its V*n_c batch rows plus its prototype; for the anchor's own class, minus the anchor). Positives:
    the same-class rows and the class's prototype; ``-mean_{p in P(i)} log(exp(s_ip) / sum_c mean_{k in c} exp(s_ik))``
    with ``s = f . f' / temperature``.

    By hand: one image of class 0, views e0 and e1, prototypes e0 and e1, temperature 1. The first view's contrast
    set: the other view (logit 0, class 0: 2 members besides the anchor), prototype 0 (logit 1, same class),
    prototype 1 (logit 0, class 1: 1 member): denominator (e^0 + e^1) / 2 + e^0 = 2.859141, log 1.050521; the
    positives are the other view and prototype 0: ((1.050521 - 0) + (1.050521 - 1)) / 2 = 0.550521.

    >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(bcl_contrastive(f, torch.eye(2), torch.tensor([0]), temperature=1.0)[0].item(), 6)
    0.550521
    """
    b = targets.shape[0]
    f, protos = _f32(features), _f32(prototypes)
    n, classes = f.shape[0], protos.shape[0]
    labels = targets.repeat(n // b)
    bank_y = torch.cat([labels, torch.arange(classes, device=labels.device)])
    logits = f @ torch.cat([f, protos.to(f.device)]).T / temperature
    not_self = torch.ones(n, n + classes, dtype=torch.bool, device=f.device)
    not_self[:, :n].fill_diagonal_(False)
    positive = (not_self & (labels.unsqueeze(1) == bank_y.unsqueeze(0))).to(f.dtype)
    classes_ = torch.arange(classes, device=bank_y.device)
    members = (bank_y.unsqueeze(1) == classes_).sum(0).to(f.dtype)  # V n_c + 1 (no host sync: no bincount, one_hot)
    members = members[bank_y].unsqueeze(0) - positive  # the anchor is not a member of its class's average
    log_weight = torch.where(not_self, -torch.log(members.clamp_min(1.0)), torch.full_like(members, -torch.inf))
    lse = torch.logsumexp(logits + log_weight, dim=1, keepdim=True)
    return (positive * (lse - logits)).sum(1) / positive.sum(1)


def _views(loss: FamilyLoss, outputs, targets: torch.Tensor, min_views: int) -> Tuple[torch.Tensor, int]:
    features = loss._output(outputs, "features", "the L2-normalised projection features of every augmented view, "
                                                 "(V*B, D) view-major")
    b = targets.shape[0]
    if targets.ndim != 1 or b == 0 or features.ndim != 2 or features.shape[0] % b or features.shape[0] // b < min_views:
        raise LossError(f"{loss.name}: outputs['features'] has shape {tuple(features.shape)} for {b} labels; it needs "
                        f"V*B rows, V >= {min_views} augmented views of each image stacked view-major (rows 0..B-1 "
                        "the first view, B..2B-1 the second): train with two views of each image")
    return features, features.shape[0] // b


class PaCoLoss(FamilyLoss):
    """PaCo with a momentum encoder (outputs carry ``"keys"``), else GPaCo: :func:`paco_loss` per image.

    Options (defaults: PaCo's CIFAR-100-LT ResNet-32 script): ``alpha`` 0.01 (the weight of each same-class sample
    positive; ImageNet-LT 0.05, GPaCo ImageNet-LT 0.045), ``beta`` 1.0 (the weight of the class-centre positive),
    ``gamma`` 1.0 (the weight of the samples in the denominator), ``temperature`` 0.05 (the samples' ``moco-t``;
    code default 0.07, ImageNet-LT 0.2); the centre logits are not divided by it (``supt`` 1). CCAR
    (``ccar=True``) weights the class-centre term, see :func:`paco_loss`.

    PaCo's code anchors only the query view (its online encoder sees only that one); with keys, so does this loss,
    and the online features and logits of the other views take no part in it.

    >>> import torch.nn.functional as F
    >>> loss_fn = PaCoLoss([100, 10, 1], reduction="none")
    >>> out = {"logits": torch.zeros(4, 3), "features": F.normalize(torch.randn(4, 8), dim=1)}
    >>> loss_fn(out, torch.tensor([0, 2])).shape
    torch.Size([2])
    """

    name = "paco"
    OPTIONS = ("alpha", "beta", "gamma", "temperature")

    def __init__(self, class_counts: CountsLike, reduction: str = "mean", *, alpha: float = 0.01, beta: float = 1.0,
                 gamma: float = 1.0, temperature: float = 0.05, ccar: bool = False, omega=None, power_base=None,
                 detach_weight=None, normalize=None, frequency=None, strength=None, **unknown):
        super().__init__(class_counts, reduction, ccar, dict(omega=omega, power_base=power_base,
                                                             detach_weight=detach_weight, normalize=normalize,
                                                             frequency=frequency, strength=strength), unknown)
        self.alpha = _number(alpha, "alpha", self.name, 0.0)
        self.beta = _number(beta, "beta", self.name, 0.0, strict=True)
        self.gamma = _number(gamma, "gamma", self.name, 0.0)
        self.temperature = _number(temperature, "temperature", self.name, 0.0, strict=True)

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        keys = outputs.get("keys") if isinstance(outputs, dict) else None
        features, views = _views(self, outputs, targets, 1 if keys is not None else 2)
        logits = self._output(outputs, "logits", "the classifier's logits of every view, (V*B, C)")
        b = targets.shape[0]
        self._check_targets(logits, targets)
        self._check_logits(logits, views * b)
        queue, queue_targets = outputs.get("queue"), outputs.get("queue_targets")
        if keys is not None and tuple(keys.shape) != (b, features.shape[1]):
            raise LossError(f"paco: outputs['keys'] must be ({b}, {features.shape[1]}), got {tuple(keys.shape)}")
        if queue is not None and (queue_targets is None or queue.ndim != 2 or queue.shape[1] != features.shape[1]
                                  or tuple(queue_targets.shape) != (queue.shape[0],)):
            raise LossError(f"paco: outputs['queue'] must be (Q, {features.shape[1]}) with outputs['queue_targets'] "
                            f"(Q,); got {tuple(queue.shape)} and "
                            f"{None if queue_targets is None else tuple(queue_targets.shape)}")
        loss = paco_loss(logits, features, targets, self.log_prior, keys=keys, queue=queue,
                         queue_targets=queue_targets, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                         temperature=self.temperature, ccar=self.weighting())
        return self._reduce(loss)


class BCLLoss(FamilyLoss):
    """BCL: ``ce_weight * LA-CE(first view's logits) + contrast_weight * mean over views of`` :func:`bcl_contrastive`.

    The logit-compensated CE is CE on ``z + tau log prior`` (``tau`` 1, BCL's ``LogitAdjust``). Options:
    ``ce_weight`` 2.0 and ``contrast_weight`` 0.6 (the paper's lambda and mu on CIFAR-LT; its code's ImageNet-LT
    defaults are 1.0 and 0.35), ``temperature`` 0.07 (the code's ``--temp``). The prototypes are the model's
    (``outputs["prototypes"]``, (C, D): its prototype head over the classifier's weights). CCAR (``ccar=True``)
    multiplies the CE term by Omega(p_t = softmax(z + tau log prior)_y, f_y): CCAR over LA; the contrastive term is
    not weighted.

    >>> import torch.nn.functional as F
    >>> loss_fn = BCLLoss([100, 10, 1], reduction="none")
    >>> out = {"logits": torch.zeros(4, 3), "features": F.normalize(torch.randn(4, 8), dim=1),
    ...        "prototypes": F.normalize(torch.randn(3, 8), dim=1)}
    >>> loss_fn(out, torch.tensor([0, 2])).shape
    torch.Size([2])
    """

    name = "bcl"
    OPTIONS = ("temperature", "ce_weight", "contrast_weight", "tau")

    def __init__(self, class_counts: CountsLike, reduction: str = "mean", *, temperature: float = 0.07,
                 ce_weight: float = 2.0, contrast_weight: float = 0.6, tau: float = 1.0, ccar: bool = False,
                 omega=None, power_base=None, detach_weight=None, normalize=None, frequency=None, strength=None,
                 **unknown):
        super().__init__(class_counts, reduction, ccar, dict(omega=omega, power_base=power_base,
                                                             detach_weight=detach_weight, normalize=normalize,
                                                             frequency=frequency, strength=strength), unknown)
        self.temperature = _number(temperature, "temperature", self.name, 0.0, strict=True)
        self.ce_weight = _number(ce_weight, "ce_weight", self.name, 0.0)
        self.contrast_weight = _number(contrast_weight, "contrast_weight", self.name)
        self.tau = _number(tau, "tau", self.name)

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        features, views = _views(self, outputs, targets, 2)
        logits = self._output(outputs, "logits", "the classifier's logits, (V*B, C) or the first view's (B, C)")
        prototypes = self._output(outputs, "prototypes", "the class prototypes (C, D): the model's prototype head "
                                                         "over the classifier's weights")
        b = targets.shape[0]
        self._check_targets(logits, targets)
        self._check_logits(logits, views * b if logits.shape[0] != b else b)
        if tuple(prototypes.shape) != (self.num_classes, features.shape[1]):
            raise LossError(f"bcl: outputs['prototypes'] must be ({self.num_classes}, {features.shape[1]}), one per "
                            f"class, got {tuple(prototypes.shape)}")
        spec = LF.BaseSpec("bcl", shift=self.tau * self.log_prior)
        ce = classification_loss(logits[:b], targets, spec, self.weighting())
        contrast = bcl_contrastive(features, prototypes, targets, self.temperature).view(views, b).mean(0)
        return self._reduce(self.ce_weight * ce + self.contrast_weight * contrast)
