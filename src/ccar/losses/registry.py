"""Name -> constructor registry so configs can say ``loss.name: ccar`` and ``loss.base: la``."""

from __future__ import annotations

from typing import Optional

from ..errors import LossError
from .functional import BASES
from .modules import CCARLoss, LongTailLoss
from .stats import CountsLike

FAMILIES = ("ride", "sade", "paco", "gpaco", "bcl")  # losses over a model's several outputs (ccar.models.families)
ROUTER = "ride-router"  # RIDE's second stage: its routers over the frozen experts (`ccar retrain RUN method=router`)
LOSS_NAMES = BASES + FAMILIES + (ROUTER, "ccar")


def _family(name: str):
    """The module class of a family loss (imported on use: they import the base losses)."""
    if name == ROUTER:
        from .router import RIDERouterLoss

        return RIDERouterLoss
    if name in ("ride", "sade"):
        from .experts import RIDELoss, SADELoss

        return {"ride": RIDELoss, "sade": SADELoss}[name]
    from .contrastive import BCLLoss, PaCoLoss

    return {"paco": PaCoLoss, "gpaco": PaCoLoss, "bcl": BCLLoss}[name]


def build_loss(name: str, class_counts: Optional[CountsLike] = None, **options) -> LongTailLoss:
    """Build loss ``name`` for training-set ``class_counts``; call the result as ``loss_fn(logits, targets)``.

    Names: ``ce``, ``focal``, ``cb`` (class-balanced CE; ``form="focal"`` or the name ``cb-focal`` for its focal
    form), ``ldam``, ``la``, ``bs``, ``vs``; the families over several model outputs ``ride``, ``sade`` (multiple
    experts), ``paco``, ``gpaco``, ``bcl`` (contrastive; called as ``loss_fn(outputs, targets)``), ``ride-router``
    (RIDE's routers, its second stage); and ``ccar``
    (``base=`` one of the others, plus the base's options).
    Every loss takes ``reduction`` and ``drw_epoch``/``drw_beta``; losses that need the epoch (DRW) are told it
    with ``loss_fn.set_epoch(epoch)``.

    >>> loss_fn = build_loss("ccar", [5000, 500, 50], base="la", tau=1.0, omega=0.75)
    >>> loss_fn
    CCARLoss(base='la', omega=0.75, power_base=2.718, detach_weight=False, normalize=None, frequency='sum', strength=1.0, tau=1.0, reduction='mean')
    """
    if not isinstance(name, str) or name not in LOSS_NAMES:
        raise LossError(f"unknown loss {name!r}; valid: {', '.join(LOSS_NAMES)}")
    if name == "ccar":
        if class_counts is None:
            raise LossError("ccar: class_counts is required (f_c = n_y / sum(n) comes from them)")
        base = options.pop("base", "ce")
        if base in FAMILIES:  # CCAR over each expert's (RIDE, SADE) or the classification term (PaCo, BCL)
            return _family(base)(class_counts, ccar=True, **options)
        if base not in BASES:
            raise LossError(f"ccar: unknown base {base!r}; valid: {', '.join(BASES + FAMILIES)}")
        return CCARLoss(class_counts, base=base, **options)
    if "base" in options:
        raise LossError(f"{name}: 'base' is an option of 'ccar' only (loss.name=ccar loss.base={options['base']})")
    if name in FAMILIES + (ROUTER,):
        return _family(name)(class_counts, **options)
    return LongTailLoss(name, class_counts, **options)
