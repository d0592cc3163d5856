"""After the search: the best setting of each of the top methods re-run over more seeds, the winner chosen by its
mean validation objective over the seeds every one of them finished, and paired intervals against the others
(:func:`ccar.report.stats.paired_ci`, the sweeps' own: a verdict only where the interval excludes 0). All on the
validation split: the test split is still unread here."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine.runtime import fmt_time
from ..errors import CCARError
from ..report.stats import mean_std, paired_ci
from .plan import plan_trial
from .search import Search, import_optuna
from .trial import run_plan, stage2_config
from .validation import read_record


def params_of(trial) -> Dict[str, Any]:
    """A trial's knobs (its parameters less the method, unprefixed)."""
    method = trial.params["method"]
    return {k.split("/", 1)[1]: v for k, v in trial.params.items() if k.startswith(method + "/")}


def ranking(study) -> List[Any]:
    """The best finished trial of each method, best first (the earlier trial on ties)."""
    optuna = import_optuna()
    best: Dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        m = t.user_attrs["method"]
        if m not in best or (t.value, -t.number) > (best[m].value, -best[m].number):
            best[m] = t
    return sorted(best.values(), key=lambda t: (-t.value, t.number))


def final_model(search: Search, method: str, params: Dict[str, Any], seed: int) -> Tuple[Path, Any, Dict[str, Any]]:
    """(folder, config, evaluation settings) of a setting's final model at ``seed``."""
    plan = plan_trial(search.base, search.methods[method], params, search.runs, seed=seed)
    if plan.stage2 is None:
        return plan.first_dir, plan.train, plan.evals
    cfg = stage2_config(plan, search.runs)
    return Path(cfg.out), cfg, plan.evals


def _estimate(study, method: str) -> Optional[float]:
    full = [t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("method") == method and t.user_attrs.get("trained")
            and t.user_attrs.get("status") == "complete"]
    return statistics.median(full) if full else None


def rerun_seeds(search: Search, top: List[Any], seeds: List[int]) -> Dict[str, Dict[int, float]]:
    """Each top method's best setting at every seed (the search's seed is its own trial); seed by seed, so that
    the methods stay paired when the budget ends; a run that cannot finish in the time left is not started."""
    clock, study = search.session.clock, search.session.study
    values = {t.user_attrs["method"]: {seeds[0]: t.value} for t in top}
    for seed in seeds[1:]:
        for t in top:
            method = t.user_attrs["method"]
            estimate = _estimate(study, method)
            if clock.left() <= 0 or (estimate is not None and estimate > clock.left()
                                     and read_record(final_model(search, method, params_of(t), seed)[0]) is None):
                search.log(f"seeds: {method} at seed {seed} not run ({fmt_time(clock.left())} left)")
                continue
            plan = plan_trial(search.base, search.methods[method], params_of(t), search.runs, seed=seed)
            try:
                result = run_plan(plan, search.runs, None, clock.deadline(), search.score())
            except CCARError as exc:
                if getattr(exc, "exit_code", None):
                    raise
                search.log(f"seeds: {method} at seed {seed} failed: {exc}")
                continue
            if result.metrics is not None:
                counts = read_record(result.model_dir)["class_counts"]
                values[method][seed] = search.objective.score(result.metrics, counts)
                search.log(f"seeds: {method} at seed {seed}: val {values[method][seed]:.2f} "
                           f"({fmt_time(result.seconds)})")
            else:
                search.log(f"seeds: {method} at seed {seed} stopped at the deadline")
            search.session.save()
    return values


def confirm(search: Search, top_n: int, n_seeds: int) -> Dict[str, Any]:
    """Re-run the top methods over ``n_seeds`` seeds; choose the winner; its paired intervals against the rest."""
    top = ranking(search.session.study)[:top_n]
    if not top:
        return {"winner": None}
    seeds = [search.base.seed + i for i in range(n_seeds)]
    values = rerun_seeds(search, top, seeds) if len(seeds) > 1 else {t.user_attrs["method"]: {seeds[0]: t.value}
                                                                      for t in top}
    paired = [s for s in seeds if all(s in v for v in values.values())]
    rows = []
    for t in top:
        method = t.user_attrs["method"]
        mean, std, n = mean_std([values[method][s] for s in paired])
        rows.append({"method": method, "label": t.user_attrs["label"], "params": params_of(t), "search_value":
                     t.value, "values": {str(s): v for s, v in values[method].items()}, "mean": mean, "std": std,
                     "n": n})
    rows.sort(key=lambda r: -(r["mean"] if r["mean"] is not None else -1e9))
    winner = rows[0]
    comparisons = []
    for other in rows[1:]:
        diffs = [values[winner["method"]][s] - values[other["method"]][s] for s in paired]
        comparisons.append({"winner": winner["method"], "other": other["method"], "seeds": paired, **paired_ci(diffs)})
    best_seed = max(values[winner["method"]], key=lambda s: (values[winner["method"]][s], -s))
    return {"seeds": seeds, "paired_seeds": paired, "rows": rows, "comparisons": comparisons,
            "winner": winner["method"], "winner_params": winner["params"], "winner_seed": best_seed}
