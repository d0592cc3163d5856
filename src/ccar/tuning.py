"""The tuning protocol of ``ccar sweep``: a method's knob candidates, and the one chosen on validation.

Every candidate runs on the first seed; the candidate with the best balanced accuracy on that seed's validation
split is the one run on the other seeds and reported. The test split plays no part in the choice.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Dict, List, Optional, Tuple

from .errors import ConfigError


def flatten(prefix: str, value) -> Dict[str, Any]:
    """Nested mappings as dotted keys: ``flatten("", {"loss": {"tau": 1}}) == {"loss.tau": 1}``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def tune_candidates(name: str, over: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The candidates of a method's ``tune`` entry ([{}] without one): the cross product of a mapping
    key -> values, or a list of override mappings.

    >>> tune_candidates("LA", {"tune": {"loss.tau": [0.5, 1.0]}})
    [{'loss.tau': 0.5}, {'loss.tau': 1.0}]
    """
    tune = over.get("tune")
    if tune is None:
        return [{}]
    if isinstance(tune, dict) and tune and all(isinstance(v, list) and v for v in tune.values()):
        keys = list(tune)
        return [dict(zip(keys, combo)) for combo in itertools.product(*tune.values())]
    if isinstance(tune, list) and tune and all(isinstance(c, dict) and c for c in tune):
        return [flatten("", c) for c in tune]
    raise ConfigError(f"sweep method {name!r}: tune must map keys to non-empty lists of values, "
                      f"or be a list of override mappings")


def _scores(rows: List[Dict[str, Any]], method: str, values: Dict[str, Any], seed: int) -> Dict[str, Optional[float]]:
    """Balanced validation accuracy of each candidate's run on ``seed`` (keyed by the candidate as sorted JSON)."""
    return {json.dumps(r.get("tuned") or {}, sort_keys=True): r["metrics"].get("val_balanced")
            for r in rows if r["method"] == method and r["seed"] == seed and r["values"] == values}


def chosen_candidate(rows: List[Dict[str, Any]], method: str, values: Dict[str, Any], candidates: List[Dict[str, Any]],
                     seed: int) -> Optional[Dict[str, Any]]:
    """The candidate whose run on ``seed`` scored the best balanced validation accuracy (first on ties); None
    until every candidate has run. The test split plays no part in the choice."""
    if len(candidates) == 1:
        return candidates[0]
    scores = _scores(rows, method, values, seed)
    keys = [json.dumps(c, sort_keys=True) for c in candidates]
    if any(k not in scores for k in keys):
        return None
    return candidates[max(range(len(keys)), key=lambda i: (scores[keys[i]] or -1.0, -i))]


def select_runs(rows: List[Dict[str, Any]], spec: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(the rows to report: each tuned method's chosen candidate only, the tuning records).

    A tuning record is {method, values, seed, candidates: [(candidate, validation balanced accuracy)], chosen}.
    """
    methods = spec.get("methods") or {}
    seed = int((spec.get("seeds") or [0])[0])
    keep, records, chosen_for = [], [], {}
    for r in rows:
        cands = tune_candidates(r["method"], dict(methods.get(r["method"]) or {}))
        if len(cands) == 1:
            keep.append(r)
            continue
        tag = (r["method"], json.dumps(r["values"], sort_keys=True))
        if tag not in chosen_for:  # once per (method, setting)
            chosen_for[tag] = chosen_candidate(rows, r["method"], r["values"], cands, seed)
            if chosen_for[tag] is not None:
                scores = _scores(rows, r["method"], r["values"], seed)
                records.append({"method": r["method"], "values": r["values"], "seed": seed, "chosen": chosen_for[tag],
                                "candidates": [(c, scores.get(json.dumps(c, sort_keys=True))) for c in cands]})
        if chosen_for[tag] is not None and (r.get("tuned") or {}) == chosen_for[tag]:
            keep.append(r)
    return keep, records
