"""Sharpness-aware minimisation around any optimizer, and gradient accumulation.

SAM (Foret et al., ICLR 2021): each step takes the gradient g at the weights w, moves to w + ε with
ε = ρ · g / ‖g‖ (one norm over all trained parameters), takes the gradient there and lets the optimizer step from w
with it. ``optim.sam=ρ`` turns it on (0: off). ``optim.sam_adaptive=true`` is ASAM (Kwon et al., ICML 2021): the
ball is scaled per weight, ε = ρ · T² g / ‖T g‖ with T = |w| + η (η = 0.01).

``optim.sam_scope=tail`` is ImbSAM (Zhou et al., ICCV 2023), the long-tail variant: the loss is split into the
head classes' part and the tail classes' part (each a sum over its samples divided by the batch size, so that they
add up to the loss); only the tail part is made flat: the step's gradient is ∇L_head(w) + ∇L_tail(w + ε), ε from
∇L_tail(w). The tail is the classes with fewer than ``optim.sam_tail_below`` training images, or (unset) the
rarest third of the classes, the "tail" of the reports.

The second forward pass runs with BatchNorm's running statistics held (momentum 0), so that they are updated
once per step as without SAM. Under torchrun the gradients of both passes are averaged over the ranks here (the
perturbation uses the global gradient), inside DDP's ``no_sync``: 2 processes equal 1 at the same global batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..config.schema import SAM_SCOPES  # noqa: F401
from ..metrics import rank_thirds
from .distributed import DistContext

ASAM_ETA = 0.01


def tail_classes(class_counts: Sequence[int], below: Optional[int]) -> List[int]:
    """ImbSAM's tail: classes with fewer than ``below`` training images, else the rarest third by rank.

    >>> tail_classes([500, 120, 40, 9, 3, 2], None), tail_classes([500, 120, 40, 9, 3, 2], 50)
    ([4, 5], [2, 3, 4, 5])
    """
    if below is not None:
        return [c for c, n in enumerate(class_counts) if n < below]
    return rank_thirds(class_counts)["tail"]


@contextlib.contextmanager
def held_batchnorm(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics but leave their running statistics as they are."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


class SAM:
    """The perturbation of one SAM step: :meth:`ascend` moves the trained parameters to w + ε from their current
    ``.grad``, :meth:`descend` moves them back. The optimizer then steps with the gradient taken at w + ε.

    >>> w = nn.Parameter(torch.tensor([3.0, 4.0])); w.grad = torch.tensor([3.0, 4.0])
    >>> sam = SAM([w], rho=0.5); sam.ascend(); w.data.tolist()
    [3.299999952316284, 4.400000095367432]
    >>> sam.descend(); w.data.tolist()
    [3.0, 4.0]
    """

    def __init__(self, params, rho: float, adaptive: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive = float(rho), adaptive
        self.eps: List[Optional[torch.Tensor]] = []

    @torch.no_grad()
    def perturbation(self) -> List[Optional[torch.Tensor]]:
        """ε for the current gradients, one tensor per parameter (None where it has no gradient)."""
        # ASAM's per-weight scale T = |w| + eta (SAM: 1); the ball's direction is T g, the step T (T g) / ||T g||
        scales = [p.abs().float() + ASAM_ETA if self.adaptive else None for p in self.params]
        scaled = [None if p.grad is None else p.grad.float() if t is None else p.grad.float() * t
                  for p, t in zip(self.params, scales)]
        present = [s for s in scaled if s is not None]
        if not present:
            return [None] * len(self.params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in present]))
        factor = self.rho / (norm + 1e-12)
        return [None if s is None else ((s if t is None else s * t) * factor).to(p.dtype)
                for p, s, t in zip(self.params, scaled, scales)]

    @torch.no_grad()
    def ascend(self, eps: Optional[List[Optional[torch.Tensor]]] = None) -> None:
        self.eps = self.perturbation() if eps is None else eps
        for p, e in zip(self.params, self.eps):
            if e is not None:
                p.add_(e)

    @torch.no_grad()
    def descend(self) -> None:
        for p, e in zip(self.params, self.eps):
            if e is not None:
                p.sub_(e)
        self.eps = []


def average_gradients(params: Sequence[nn.Parameter], ctx: DistContext) -> None:
    """Gradients averaged over the ranks in one all-reduce (what DDP does, for passes run under ``no_sync``)."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = ctx.all_reduce_sum(flat) / ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def no_sync(net: nn.Module):
    """DDP's ``no_sync`` (gradients stay local) for a DDP module, else nothing."""
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()


def _drop_gradients(params: Sequence[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def sam_backward(sam: SAM, model: nn.Module, per_sample: torch.Tensor, targets: torch.Tensor,
                 losses_again: Callable[[], torch.Tensor], ctx: DistContext,
                 tail: Optional[torch.Tensor] = None) -> None:
    """Leave in ``.grad`` the gradient of one SAM (``tail`` None) or ImbSAM step; the weights end where they were.

    ``per_sample``: this batch's losses at w (their graph); ``losses_again()``: a new forward pass's losses at the
    current weights; ``tail``: a boolean per class. Call it under DDP's ``no_sync``: the gradients of each pass are
    averaged over the ranks here."""
    n = len(per_sample)
    if tail is None:
        per_sample.mean().backward()
        average_gradients(sam.params, ctx)
        sam.ascend()
        _drop_gradients(sam.params)
        with held_batchnorm(model):
            losses_again().mean().backward()
    else:
        in_tail = tail[targets].to(per_sample.dtype)
        (per_sample * in_tail).sum().div(n).backward(retain_graph=True)
        average_gradients(sam.params, ctx)
        eps = sam.perturbation()  # from the tail's gradient only
        _drop_gradients(sam.params)
        (per_sample * (1 - in_tail)).sum().div(n).backward()
        average_gradients(sam.params, ctx)
        head = [None if p.grad is None else p.grad.clone() for p in sam.params]
        _drop_gradients(sam.params)
        sam.ascend(eps)
        with held_batchnorm(model):
            (losses_again() * in_tail).sum().div(n).backward()
    average_gradients(sam.params, ctx)
    sam.descend()
    if tail is not None:
        for p, g in zip(sam.params, head):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)


def optimizer_summary(o, world_size: int, tail: Optional[torch.Tensor]) -> str:
    """One line on what a step is: the effective batch (with the linear lr-scaling rule) and SAM's setting.

    >>> from ccar.config import OptimConfig
    >>> optimizer_summary(OptimConfig(batch_size=64, accumulate=4, lr=0.1), 2, None)
    'optim.accumulate=4: effective batch 4 x 64 per process x 2 processes = 512 (linear scaling rule: lr 0.1 for 512 is 0.05 per 256)'
    """
    parts = []
    if o.accumulate > 1 or world_size > 1:
        total = o.accumulate * o.batch_size * world_size
        parts.append(f"optim.accumulate={o.accumulate}: effective batch {o.accumulate} x {o.batch_size} per process x "
                     f"{world_size} process{'es' if world_size > 1 else ''} = {total} (linear scaling rule: lr "
                     f"{o.lr:g} for {total} is {o.lr * 256 / total:.3g} per 256)")
    if o.sam:
        kind = "ASAM" if o.sam_adaptive else "SAM"
        k = 0 if tail is None else int(tail.sum())
        scope = f", ImbSAM: only the loss of the {k} tail class{'es' if k != 1 else ''} made flat" if k else ""
        passes = "two forward and three backward passes" if k else "two forward/backward passes"
        parts.append(f"{kind} rho={o.sam:g}{scope}: {passes} per step")
    return "; ".join(parts)
