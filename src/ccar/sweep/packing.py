"""Which cells of a sweep train together as one pack (``pack: auto | N | off`` in the sweep file;
:mod:`ccar.engine.pack_train`): cells that share architecture, data shape, batch size, epochs and precision, and
differ only in what each cell owns (loss, sampler, seed, learning rate and schedule, augmentation, ...)."""

from __future__ import annotations

import functools
from typing import Callable, List, Optional

from ..config import load_config
from ..engine.pack_train import pack_blocker, pack_key
from ..errors import ConfigError
from .spec import Cell

AUTO_PACK = 16  # pack: auto on a GPU: the measured K of docs/benchmarks.md (an H200, ResNet-32 at batch 128)


def pack_size(value, launcher: str, cuda: bool) -> tuple:
    """(cells per pack, why) for the sweep file's ``pack`` (YAML reads ``off`` as false).

    >>> pack_size("auto", "local", cuda=False)[0], pack_size(4, "local", cuda=False)[0], pack_size(False, "local", True)[0]
    (1, 4, 1)
    """
    value = "auto" if value is None else value
    if value is True or isinstance(value, float):
        raise ConfigError(f"sweep key pack must be auto, off or a number of cells >= 1; got {value!r}")
    if value is False or value == "off" or value == 1:
        return 1, "pack: off"
    if launcher == "slurm":
        return 1, "packs run with the local launcher only: on Slurm each cell is its own job"
    if value == "auto":
        if not cuda:
            return 1, "pack: auto packs on a GPU only (on the CPU one packed program is slower than its runs in turn)"
        return AUTO_PACK, f"pack: auto on a GPU: up to {AUTO_PACK} cells as one program"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"sweep key pack must be auto, off or a number of cells >= 1; got {value!r}")
    return value, f"pack: up to {value} cells as one program"


@functools.lru_cache(maxsize=None)
def _key(overrides: tuple) -> Optional[str]:
    cfg = load_config(None, list(overrides))
    return None if pack_blocker(cfg) else pack_key(cfg)


def cell_pack_key(cell: Cell, nproc: int = 1) -> Optional[str]:
    """The key that cells packed together share (None: this cell trains alone -- it reuses another cell's
    training, runs under torchrun, or :func:`~ccar.engine.pack_train.pack_blocker` names a reason)."""
    if cell.shares is not None or nproc > 1:
        return None
    return _key(tuple(cell.overrides))


def grouper(size: int, nproc: int = 1) -> Callable[[List[Cell]], List[Cell]]:
    """``group(todo)``: the first ready cell and up to ``size`` - 1 later ones with its pack key."""
    def group(todo: List[Cell]) -> List[Cell]:
        key = cell_pack_key(todo[0], nproc) if size > 1 else None
        if key is None:
            return todo[:1]
        return [c for c in todo if cell_pack_key(c, nproc) == key][:size]

    return group
