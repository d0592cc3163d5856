"""A sweep file: its keys, and its cells -- every (method, grid values, seed) it names, with the config overrides
of each (:func:`expand`), and which cells train the same model (:func:`training_identity`)."""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import load_config, load_yaml, to_dict
from ..config.schema import RETRAIN_METHODS
from ..errors import ConfigError
from ..tuning import chosen_candidate, flatten, tune_candidates

SWEEP_KEYS = ("out", "runs", "jobs", "gpus_per_run", "pack", "base", "seeds", "grid", "methods", "studies", "report")
REPORT_KEYS = ("metric", "reference", "baselines", "per_class", "curves", "knobs", "labels", "last_epoch")


@dataclass
class Cell:
    method: str
    values: Dict[str, Any]  # grid values
    seed: int
    overrides: List[str]
    stage2: Optional[List[str]] = None  # `ccar retrain` overrides (method=crt|lws|ft|las|ncm, ...) for two stages
    tuned: Dict[str, Any] = field(default_factory=dict)  # this cell's candidate of the method's `tune` grid
    shares: Optional[str] = None  # key of an earlier cell that trains the same (first-stage) model: reuse its run

    @property
    def key(self) -> str:
        flat = {}
        for k, v in self.values.items():
            flat.update({k: v["name"]} if k == "setting" and "name" in v else flatten(k, v))
        parts = ([self.method] + [f"{k}={v}" for k, v in sorted(flat.items())]
                 + [f"{k}={v}" for k, v in sorted(self.tuned.items())] + [f"seed={self.seed}"])
        return "/".join(parts)


def grid_overrides(key: str, value) -> Dict[str, Any]:
    """The config overrides of one grid value: ``key=value``; a mapping sets ``key.sub`` keys together; under the
    key ``setting`` a mapping is a whole named setting (any config keys; ``name`` labels it in keys and reports).

    >>> grid_overrides("setting", {"name": "small", "dataset": "csv", "model": {"hidden": [8]}})
    {'dataset': 'csv', 'model.hidden': [8]}
    """
    if key == "setting" and isinstance(value, dict):
        return flatten("", {k: v for k, v in value.items() if k != "name"})
    return flatten(key, value)


def _as_override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else value}"


def load_sweep(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    spec = load_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r}; valid: {', '.join(SWEEP_KEYS)}")
    report = spec.get("report") or {}
    unknown = sorted(set(report) - set(REPORT_KEYS)) if isinstance(report, dict) else ["(not a mapping)"]
    if unknown:
        raise ConfigError(f"{path}: unknown report key {unknown[0]!r}; valid: {', '.join(REPORT_KEYS)}")
    if not spec.get("methods") or not isinstance(spec["methods"], dict):
        raise ConfigError(f"{path}: 'methods' must map method names to config overrides")
    return spec


def expand(spec: Dict[str, Any], rows: Optional[List[Dict[str, Any]]] = None, pending: Optional[list] = None) -> List[Cell]:
    """Every (method, grid values, seed) cell of the sweep, main grid first, then the studies; no duplicates.

    A tuned method contributes its candidates on the first seed, and its other seeds once ``rows`` (the results so
    far) hold every candidate's run; until then those cells are left out (counted in ``pending`` if given).
    """
    base = [_as_override(k, v) for k, v in flatten("", spec.get("base") or {}).items()]
    methods, stage2, candidates = {}, {}, {}
    for name, over in spec["methods"].items():
        over = dict(over or {})
        candidates[name] = tune_candidates(name, over)
        over.pop("tune", None)
        second = over.pop("stage2", None)
        if second is not None and (not isinstance(second, dict) or second.get("method") not in RETRAIN_METHODS):
            raise ConfigError(f"sweep method {name!r}: stage2 must be a mapping with method: {', '.join(RETRAIN_METHODS)}")
        methods[name] = [_as_override(k, v) for k, v in flatten("", over).items()]
        stage2[name] = None if second is None else [_as_override(k, v) for k, v in flatten("", second).items()]
    seeds = [int(s) for s in spec.get("seeds") or [0]]
    blocks = [(list(methods), spec.get("grid") or {})]
    for study in spec.get("studies") or []:
        names = study.get("methods") or list(methods)
        missing = [n for n in names if n not in methods]
        if missing:
            raise ConfigError(f"sweep study names unknown method {missing[0]!r}; methods: {', '.join(methods)}")
        blocks.append((names, study.get("grid") or {}))
    cells, seen = [], set()

    def add(name, values, seed, tuned):
        over = (base + methods[name] + [_as_override(fk, fv) for k, v in values.items()
                                        for fk, fv in grid_overrides(k, v).items()]
                + [_as_override(k, v) for k, v in tuned.items()] + [f"seed={seed}"])
        cell = Cell(name, values, seed, over, stage2[name], dict(tuned))
        if cell.key not in seen:
            seen.add(cell.key)
            cells.append(cell)

    for names, grid in blocks:
        keys = list(grid)
        for combo in itertools.product(*[grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]):
            values = dict(zip(keys, combo))
            for name in names:
                if len(candidates[name]) == 1:
                    for seed in seeds:
                        add(name, values, seed, candidates[name][0])
                    continue
                for tuned in candidates[name]:
                    add(name, values, seeds[0], tuned)
                chosen = chosen_candidate(rows or [], name, values, candidates[name], seeds[0])
                if chosen is None:
                    if pending is not None:
                        pending.extend(seeds[1:])
                    continue
                for seed in seeds[1:]:
                    add(name, values, seed, chosen)
    owners: Dict[str, Cell] = {}  # one training per model: a later cell that trains the same reuses the first's run
    for cell in cells:
        owner = owners.setdefault(training_identity(tuple(cell.overrides)), cell)
        cell.shares = None if owner is cell else owner.key
    return cells


EVAL_ONLY = ("tau_norm", "posthoc_tau")  # settings that change how a trained model is scored, not its training


@functools.lru_cache(maxsize=None)
def training_identity(overrides: tuple) -> str:
    """What a cell trains (its first stage, for two-stage methods): the resolved config less the evaluation-only
    settings. Cells with the same identity train the same model to the bit (CPU runs are deterministic), so a sweep
    trains it once: cRT, LWS and tau-norm beside CE with the same seed and settings reuse CE's run."""
    resolved = to_dict(load_config(None, list(overrides)))
    for key in EVAL_ONLY + ("out", "progress", "threads", "feature_cache"):
        resolved.pop(key)
    return json.dumps(resolved, sort_keys=True)
