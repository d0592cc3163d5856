"""``ccar tune``'s own keys (``budget=15m``, ``objective=``, ``candidates=``, ...), split from the run keys that it
passes to every trial as ``ccar train`` would take them; bad values are one-line errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import parse_override
from ..errors import ConfigError
from .objective import Objective, parse_objective

PRUNERS = ("hyperband", "halving", "none")
TUNE_KEYS = ("budget", "objective", "candidates", "seeds", "top", "trials", "pruner", "out")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*$")


def parse_budget(value: Any) -> float:
    """Seconds of a budget: a number (seconds) or a number with ``s``, ``m`` or ``h``.

    >>> parse_budget("15m"), parse_budget("90s"), parse_budget("1.5h"), parse_budget(30)
    (900.0, 90.0, 5400.0, 30.0)
    """
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"budget must be a duration such as 90s, 15m or 2h; got {value!r}")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"budget must be more than zero (e.g. budget=15m); got {value!r}")
    return seconds


@dataclass
class TuneOptions:
    """What ``ccar tune`` searches for and how long: ``budget`` (seconds of wall-clock for the search and the seed
    re-runs; the winner's final test evaluation comes after it), the ``objective`` scored on the validation split,
    the ``candidates`` (names of the default set, or a sweep file whose ``methods`` to search), ``seeds`` (the
    top methods are re-run until each has this many), ``top`` (how many methods are re-run), ``trials`` (a cap on
    search trials; default: until the budget or the search space is spent), the ``pruner``, and ``out``."""

    budget: float = 900.0
    objective: Objective = field(default_factory=lambda: parse_objective("balanced"))
    candidates: Optional[List[str]] = None
    candidates_file: Optional[str] = None
    seeds: int = 3
    top: int = 2
    trials: Optional[int] = None
    pruner: str = "hyperband"
    out: Optional[Path] = None


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}; got {value!r}")
    return value


def _candidates(value: Any, options: TuneOptions) -> None:
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        if not Path(value).is_file():
            raise ConfigError(f"candidates: sweep file {value} not found")
        options.candidates_file = value
        return
    names = value if isinstance(value, list) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ConfigError("candidates must name at least one method (e.g. candidates=CE,LA,cRT) or a sweep file")
    options.candidates = names


def split_overrides(overrides: Sequence[str]) -> Tuple[TuneOptions, List[str]]:
    """(the tune options, the remaining ``key=value`` items: run keys for every trial).

    >>> o, rest = split_overrides(["budget=2m", "objective=tail", "loss.name=ce", "epochs=3"])
    >>> o.budget, o.objective.name, rest
    (120.0, 'tail', ['loss.name=ce', 'epochs=3'])
    """
    options, rest = TuneOptions(), []
    for item in overrides:
        key, value = parse_override(item)
        if key not in TUNE_KEYS:
            rest.append(item)
        elif key == "budget":
            options.budget = parse_budget(value)
        elif key == "objective":
            options.objective = parse_objective(value)
        elif key == "candidates":
            _candidates(value, options)
        elif key in ("seeds", "top"):
            setattr(options, key, _int(key, value, 1))
        elif key == "trials":
            options.trials = _int(key, value, 1)
        elif key == "pruner":
            if value not in PRUNERS:
                raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}; got {value!r}")
            options.pruner = value
        else:
            options.out = Path(str(value)).expanduser()
    return options, rest


def describe(options: TuneOptions) -> Dict[str, Any]:
    """The options as plain data (``tune.json``)."""
    return {"budget_seconds": options.budget, "objective": options.objective.describe(),
            "candidates": options.candidates_file or options.candidates, "seeds": options.seeds, "top": options.top,
            "trials": options.trials, "pruner": options.pruner, "out": str(options.out)}
