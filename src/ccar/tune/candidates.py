"""The methods ``ccar tune`` chooses among, in the sweep files' format (``configs/sweeps/*.yaml``, ``methods:``):
each method's fixed config overrides, ``stage2:`` for a second stage (``ccar retrain``), and its knobs as lists of
values to search (``search:`` here; a sweep file's ``tune:`` lists are searched the same way).

``lr`` and ``stage2.lr`` are multiples of the run's own ``optim.lr``; every other knob is a config key. The middle
value of each list is the method's default, which the search tries first.

The default set is what the committed studies found strong and cheap (docs/results.md): CE, LA, BS, CCAR-LA,
class-balanced and square-root re-sampling, cRT, tau-norm and post-hoc LA (the last three over a CE first stage
with the same settings, trained once), MiSLAS. Over a frozen backbone (``finetune=linear``: cached features, every
epoch costs one pass of a linear head) every head method runs.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config.schema import RETRAIN_METHODS
from ..errors import ConfigError
from ..tuning import flatten, tune_candidates

LR = [0.5, 1.0, 2.0]
STAGE2_LR = [0.25, 0.5, 1.0]


def _common() -> Dict[str, Dict[str, Any]]:
    """The methods of both sets, cheapest first for a CE model: one CE run serves CE, tau-norm, post-hoc LA and
    cRT's first stage."""
    return {
        "CE": {"loss.name": "ce", "search": {"lr": LR}},
        "tau-norm": {"loss.name": "ce", "tau_norm": "auto", "search": {"lr": LR}},
        "post-hoc-LA": {"loss.name": "ce", "search": {"lr": LR, "posthoc_tau": [0.5, 1.0, 1.5]}},
        "cRT": {"loss.name": "ce", "stage2": {"method": "crt"}, "search": {"lr": LR, "stage2.lr": STAGE2_LR}},
        "CB-RS": {"loss.name": "ce", "sampler": "class-balanced", "search": {"lr": LR}},
        "LA": {"loss.name": "la", "search": {"lr": LR, "loss.tau": [0.5, 0.75, 1.0, 1.5, 2.0]}},
        "CCAR-LA": {"loss.name": "ccar", "loss.base": "la",
                    "search": {"lr": LR, "loss.omega": [0.5, 0.75, 0.9], "loss.tau": [0.5, 1.0, 1.5]}},
        "SQRT-RS": {"loss.name": "ce", "sampler": "sqrt", "search": {"lr": LR}},
        "BS": {"loss.name": "bs", "search": {"lr": LR}},
    }


def default_methods(epochs: int, linear: bool) -> Dict[str, Dict[str, Any]]:
    """The default candidates for a run of ``epochs`` epochs; ``linear``: over a frozen backbone, every head
    method (MiSLAS, whose second stage shifts the backbone's BatchNorm statistics, is for trained backbones)."""
    methods = _common()
    if not linear:
        methods["MiSLAS"] = {"loss.name": "ce", "mix": "mixup", "stage2": {"method": "las"},
                             "search": {"lr": LR, "mix_alpha": [0.2, 0.5, 1.0], "stage2.lr": STAGE2_LR}}
        return methods
    methods.update({
        "LWS": {"loss.name": "ce", "stage2": {"method": "lws"}, "search": {"lr": LR, "stage2.lr": STAGE2_LR}},
        "NCM": {"loss.name": "ce", "stage2": {"method": "ncm"}, "search": {"lr": LR}},
        "CCAR-CE": {"loss.name": "ccar", "loss.base": "ce", "search": {"lr": LR, "loss.omega": [0.5, 0.75, 0.9]}},
        "Focal": {"loss.name": "focal", "search": {"lr": LR, "loss.gamma": [0.5, 1.0, 2.0]}},
        "CB": {"loss.name": "cb", "search": {"lr": LR, "loss.beta": [0.99, 0.999, 0.9999]}},
        "LDAM-DRW": {"loss.name": "ldam", "loss.drw_epoch": max(1, int(0.75 * epochs)) if epochs > 1 else None,
                     "search": {"lr": LR, "loss.max_margin": [0.3, 0.5, 1.0]}},
        "VS": {"loss.name": "vs", "search": {"lr": LR, "loss.gamma": [0.1, 0.2, 0.3], "loss.tau": [1.0, 1.5, 2.0]}},
    })
    return methods


@dataclass
class Method:
    """One candidate: ``fixed`` first-stage overrides (dotted keys), ``stage2`` retrain overrides (``method=``
    among them) or None, and ``dims``: each knob with its values (a sweep file's list of override mappings is one
    knob, ``tune``, whose values index the list in ``choices``)."""

    name: str
    fixed: Dict[str, Any]
    stage2: Optional[Dict[str, Any]] = None
    dims: List[Tuple[str, List[Any]]] = field(default_factory=list)
    choices: List[Dict[str, Any]] = field(default_factory=list)

    def default(self) -> Dict[str, Any]:
        """The middle value of every knob."""
        return {key: values[len(values) // 2] for key, values in self.dims}

    def size(self) -> int:
        """Settings in its search space."""
        n = 1
        for _, values in self.dims:
            n *= len(values)
        return n

    def settings(self) -> List[Dict[str, Any]]:
        """Every setting of its knobs (for counting what the search has tried)."""
        keys = [k for k, _ in self.dims]
        return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in self.dims])]


def _method(name: str, over: Dict[str, Any]) -> Method:
    over = dict(over or {})
    search, tune = over.pop("search", None) or {}, over.pop("tune", None)
    stage2 = over.pop("stage2", None)
    if stage2 is not None and (not isinstance(stage2, dict) or stage2.get("method") not in RETRAIN_METHODS):
        raise ConfigError(f"candidate {name!r}: stage2 must be a mapping with method: {', '.join(RETRAIN_METHODS)}")
    if not isinstance(search, dict) or any(not isinstance(v, list) or not v for v in search.values()):
        raise ConfigError(f"candidate {name!r}: search must map knobs to non-empty lists of values")
    dims = [(k, list(v)) for k, v in search.items()]
    choices: List[Dict[str, Any]] = []
    if tune is not None:
        found = tune_candidates(name, {"tune": tune})
        if isinstance(tune, dict):
            dims += [(k, list(v)) for k, v in tune.items()]
        else:
            choices = found
            dims.append(("tune", list(range(len(found)))))
    fixed = {k: v for k, v in flatten("", over).items() if v is not None}
    return Method(name, fixed, None if stage2 is None else flatten("", stage2), dims, choices)


def load_methods(epochs: int, linear: bool, names: Optional[List[str]] = None,
                 sweep_file: Optional[str] = None) -> Tuple[Dict[str, Method], Dict[str, Any]]:
    """(the candidates by name, the ``base`` overrides of ``sweep_file`` or {}): the default set (or its methods
    in ``names``, in their default order), or a sweep file's methods."""
    base: Dict[str, Any] = {}
    if sweep_file:
        from ..sweep.spec import load_sweep

        spec = load_sweep(sweep_file)
        raw, base = spec["methods"], flatten("", spec.get("base") or {})
    else:
        raw = default_methods(epochs, linear)
    if names:
        unknown = [n for n in names if n not in raw]
        if unknown:
            raise ConfigError(f"unknown candidate {unknown[0]!r}; valid: {', '.join(raw)}")
        raw = {n: raw[n] for n in raw if n in names}
    return {n: _method(n, over) for n, over in raw.items()}, base


def label(params: Dict[str, Any]) -> str:
    """A trial's knobs as text: ``lr x2, loss.tau 1.5``."""
    return ", ".join(f"{k} x{v:g}" if k in ("lr", "stage2.lr") else f"{k} {json.dumps(v)}" for k, v in params.items())
