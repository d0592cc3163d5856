"""Mixing of training batches: mixup, CutMix and Remix, on the device, for resident and streamed data alike.

``mix=mixup`` (Zhang et al., ICLR 2018): x = λ·x_i + (1 − λ)·x_j, λ ~ Beta(α, α), j a random permutation of the
batch. ``mix=cutmix`` (Yun et al., ICCV 2019): a box of area ≈ (1 − λ) of the image is pasted from x_j; λ is then
the exact share of pixels kept. ``mix=remix`` (Chou et al., ECCV-W 2020): mixup's images, with a label rule for
imbalanced pairs: λ_y = 0 when n_i / n_j ≥ κ and λ < τ, λ_y = 1 when n_i / n_j ≤ 1/κ and 1 − λ < τ, else λ_y = λ
(the label leans to the rarer class). Each batch is mixed with probability ``mix_prob``, in epochs before
``mix_until`` (deferred schedules stop mixing for the last epochs).

**The loss of a mixed sample** is λ_y · L(z, y_i) + (1 − λ_y) · L(z, y_j) for every loss: each count-based loss is
evaluated at each of the two labels with that label's statistics — CB's weight, LDAM's margin, LA's/BS's/VS's
adjustment, and CCAR's Ω from p_t = softmax(z')_y and f_c = f_y of that label (so Ω_i and Ω_j, each with its own
exploration/consolidation branch) — and the two are mixed. It is what mixing with a one-hot cross-entropy is, and
it keeps every loss a function of hard labels. ImbSAM's head/tail split uses the first label y_i.

Random draws (λ, the permutation, the box, whether to mix) come from torch's generator, which is seeded per epoch
and saved in mid-epoch checkpoints: a resumed run mixes the same pairs. Under torchrun each process mixes within its
own batch (as timm's and the published recipes do), so 2 processes pair other samples than 1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config.schema import MIX_MODES  # noqa: F401
from ..errors import ConfigError


def remix_lambda(lam: torch.Tensor, counts: torch.Tensor, y_i: torch.Tensor, y_j: torch.Tensor,
                 kappa: float = 3.0, tau: float = 0.5) -> torch.Tensor:
    """Remix's label weight of y_i per sample, from the images' weight ``lam`` (a scalar or one per sample).

    >>> counts = torch.tensor([500.0, 100.0, 10.0])
    >>> remix_lambda(torch.tensor(0.3), counts, torch.tensor([0, 2, 0, 1]), torch.tensor([2, 0, 1, 2])).tolist()
    [0.0, 0.30000001192092896, 0.0, 0.0]
    >>> remix_lambda(torch.tensor(0.7), counts, torch.tensor([2, 0]), torch.tensor([0, 1])).tolist()
    [1.0, 0.699999988079071]
    """
    lam = torch.as_tensor(lam, dtype=torch.float32, device=y_i.device).expand(y_i.shape)
    ratio = counts[y_i].float() / counts[y_j].float()
    out = lam.clone()
    out[(ratio >= kappa) & (lam < tau)] = 0.0
    out[(ratio <= 1 / kappa) & (1 - lam < tau)] = 1.0
    return out


def _box(height: int, width: int, lam: float) -> Tuple[int, int, int, int]:
    """CutMix's box: sides sqrt(1 − λ) of the image's, centred uniformly, clipped to the image."""
    cut = (1.0 - lam) ** 0.5
    h, w = int(height * cut), int(width * cut)
    cy = int(torch.randint(height, (1,)))
    cx = int(torch.randint(width, (1,)))
    return max(cy - h // 2, 0), min(cy + h // 2, height), max(cx - w // 2, 0), min(cx + w // 2, width)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mode: str, alpha: float, counts: Optional[torch.Tensor] = None,
              prob: float = 1.0, kappa: float = 3.0, tau: float = 0.5
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed x, the partners' labels y_j, λ_y per sample); an unmixed batch (probability 1 − ``prob``) has λ_y = 1.

    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.arange(4.0).view(4, 1), torch.tensor([0, 1, 2, 3])
    >>> mixed, y_j, lam = mix_batch(x, y, "mixup", alpha=1.0)
    >>> torch.allclose(mixed, lam[:, None] * x + (1 - lam[:, None]) * x[[int((y == t).nonzero()) for t in y_j]])
    True
    """
    use = float(torch.rand(())) < prob
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if use else 1.0
    perm = torch.randperm(len(y)).to(y.device)
    if not use:
        return x, y, torch.ones(len(y), device=x.device)
    if mode == "cutmix":
        if x.dim() != 4:
            raise ConfigError(f"mix=cutmix pastes image boxes; this data has samples of shape {tuple(x.shape[1:])} "
                              "(use mix=mixup)")
        top, bottom, left, right = _box(x.shape[2], x.shape[3], lam)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[2] * x.shape[3])
    else:
        x = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
    y_j = y[perm]
    if mode == "remix":
        return x, y_j, remix_lambda(torch.tensor(lam), counts, y, y_j, kappa, tau)
    return x, y_j, torch.full((len(y),), lam, device=x.device)


def mixed_losses(loss_fn, logits: torch.Tensor, y_i: torch.Tensor, y_j: torch.Tensor, lam: torch.Tensor
                 ) -> torch.Tensor:
    """Per-sample λ_y · L(z, y_i) + (1 − λ_y) · L(z, y_j) (``loss_fn`` with reduction ``none``)."""
    return lam * loss_fn(logits, y_i) + (1 - lam) * loss_fn(logits, y_j)

