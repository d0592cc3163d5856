"""The tuning protocol of ``ccar sweep``: a method's knob candidates, and the one chosen on validation.

Every candidate runs on the first seed; the candidate with the best balanced accuracy on that seed's validation
split is the one run on the other seeds and reported. The test split plays no part in the choice.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Dict, List, Optional, Tuple

from .errors import ConfigError


def _flatten(prefix: str, value) -> Dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
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
        return [_flatten("", c) for c in tune]
    raise ConfigError(f"sweep method {name!r}: tune must map keys to non-empty lists of values, "
                      f"or be a list of override mappings")


def chosen_candidate(rows: List[Dict[str, Any]], method: str, values: Dict[str, Any], candidates: List[Dict[str, Any]],
                     seed: int) -> Optional[Dict[str, Any]]:
    """The candidate whose run on ``seed`` scored the best balanced validation accuracy (first on ties); None
    until every candidate has run. The test split plays no part in the choice."""
    if len(candidates) == 1:
        return candidates[0]
    scores = {}
    for r in rows:
        if r["method"] == method and r["seed"] == seed and r["values"] == values:
            scores[json.dumps(r.get("tuned") or {}, sort_keys=True)] = r["metrics"].get("val_balanced") or -1.0
    keys = [json.dumps(c, sort_keys=True) for c in candidates]
    if any(k not in scores for k in keys):
        return None
    return candidates[max(range(len(keys)), key=lambda i: (scores[keys[i]], -i))]


def select_runs(rows: List[Dict[str, Any]], spec: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """(the rows to report: each tuned method's chosen candidate only, the tuning records).

    A tuning record is {method, values, seed, candidates: [(candidate, validation balanced accuracy)], chosen}.
    """
    methods = spec.get("methods") or {}
    seeds = [int(s) for s in spec.get("seeds") or [0]]
    keep, records, seen = [], [], set()
    for r in rows:
        cands = tune_candidates(r["method"], dict(methods.get(r["method"]) or {})) if r["method"] in methods else [{}]
        if len(cands) == 1:
            keep.append(r)
            continue
        chosen = chosen_candidate(rows, r["method"], r["values"], cands, seeds[0])
        if chosen is not None and (r.get("tuned") or {}) == chosen:
            keep.append(r)
        tag = (r["method"], json.dumps(r["values"], sort_keys=True))
        if tag not in seen and chosen is not None:
            seen.add(tag)
            scores = {json.dumps(x.get("tuned") or {}, sort_keys=True): x["metrics"].get("val_balanced")
                      for x in rows if x["method"] == r["method"] and x["values"] == r["values"] and x["seed"] == seeds[0]}
            records.append({"method": r["method"], "values": r["values"], "seed": seeds[0], "chosen": chosen,
                            "candidates": [(c, scores.get(json.dumps(c, sort_keys=True))) for c in cands]})
    return keep, records
