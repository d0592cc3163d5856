"""The search: Optuna's TPE over the candidate method (a categorical) and that method's knobs, one trial at a
time, each trial an ordinary run whose per-epoch validation objective feeds the pruner. Every candidate's default
setting runs first (in the order of :mod:`ccar.tune.candidates`: one CE model serves four of them), unpruned,
then TPE with the pruner; when TPE proposes a setting already tried (it returns to the best one of a small grid),
the next trial is a setting not yet tried, drawn at random.
The search stops when the budget left cannot fit another trial (the seed re-runs' time kept back), when every
setting has been tried, at ``trials=``, or when TPE keeps proposing settings already tried."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..config import TrainConfig
from ..engine.runtime import fmt_time, progress
from ..errors import CCARError
from .candidates import Method, label
from .objective import Objective
from .plan import plan_trial
from .session import Session, import_optuna
from .trial import TrialResult, run_plan
from .validation import read_record

CONFIRM_SHARE = 0.3  # of the budget at most, kept back for re-running the top methods over more seeds
REPEATS = 25  # consecutive proposals of settings already tried, after which the search stops


@dataclass
class Search:
    """What a search needs: the session, the base config, the candidates, the objective, where runs go."""

    session: Session
    base: TrainConfig
    methods: Dict[str, Method]
    objective: Objective
    runs: Path
    trials: Optional[int]
    confirm_runs: int  # seed re-runs after the search: top methods x extra seeds
    log: Callable[[str], None]

    def score(self) -> Optional[Callable]:
        return None if self.objective.name == "balanced" else self.objective.score

    def reserve(self) -> float:
        """Seconds kept back for the seed re-runs: what they will take (the median finished trial, with a quarter
        more), at most :data:`CONFIRM_SHARE` of the budget; that share until a trial has finished."""
        if not self.confirm_runs:
            return 0.0
        share = CONFIRM_SHARE * self.session.clock.budget
        full = _full_seconds(self.session.study)
        return share if not full else min(share, 1.25 * self.confirm_runs * statistics.median(full))


def enqueue_defaults(search: Search) -> None:
    """A new study starts with every candidate at its default knobs, in the candidates' order."""
    if search.session.study.get_trials(deepcopy=False):
        return
    for name, method in search.methods.items():
        search.session.study.enqueue_trial({"method": name, **{f"{name}/{k}": v for k, v in method.default().items()}})


def finished(study) -> List[Any]:
    optuna = import_optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state in (optuna.trial.TrialState.COMPLETE,
                                                                        optuna.trial.TrialState.PRUNED)]


def _full_seconds(study) -> List[float]:
    """Seconds of the finished trials that trained their whole run (not read back from an earlier one)."""
    return [t.user_attrs["seconds"] for t in finished(study) if t.user_attrs.get("trained")
            and t.user_attrs.get("status") == "complete"]


def untried(search: Search) -> List[Tuple[str, Dict[str, Any]]]:
    """The (method, knobs) settings no trial has finished, been pruned in or failed in, in the candidates' order."""
    seen = {(t.user_attrs.get("method"), t.user_attrs.get("label")) for t in search.session.study.get_trials(
        deepcopy=False) if t.user_attrs.get("status") not in (None, "interrupted")}
    return [(name, params) for name, method in search.methods.items() for params in method.settings()
            if (name, label(params)) not in seen]


def explore(search: Search, trial) -> None:
    """After TPE proposed a setting already tried (on a small grid it keeps returning to the best one), queue a
    setting not yet tried, drawn at random (seeded by the trial), so that the next trial learns something."""
    todo = untried(search)
    if todo:
        name, params = random.Random(search.base.seed * 100_003 + trial.number).choice(todo)
        search.session.study.enqueue_trial({"method": name, **{f"{name}/{k}": v for k, v in params.items()}})


def _why_stop(search: Search, repeats: int) -> Optional[str]:
    """Why no further trial should start (None: go on)."""
    left = search.session.clock.left() - search.reserve()
    done = finished(search.session.study)
    full = _full_seconds(search.session.study)
    if left <= 0:
        return "the search's share of the budget is spent"
    if full and statistics.median(full) > left:
        return f"{fmt_time(left)} left, less than a trial takes ({fmt_time(statistics.median(full))})"
    if search.trials is not None and len(done) >= search.trials:
        return f"trials={search.trials} reached"
    if not untried(search):
        return "every setting of every candidate has been tried (or pruned, or failed)"
    if repeats >= REPEATS:
        return f"TPE proposed {REPEATS} settings in a row that had been tried"
    return None


def _record(trial, result: TrialResult, value: Optional[float], method: str, params: Dict[str, Any],
            spent: float, runs: Path) -> None:
    attrs = {"method": method, "label": label(params), "status": result.status, "seconds": result.seconds,
             "trained": result.trained, "epochs": result.epochs, "spent": spent, "value": value,
             "model_dir": str(result.model_dir.relative_to(runs.parent) if result.model_dir.is_relative_to(runs.parent)
                              else result.model_dir)}
    if result.metrics is not None:
        attrs["val"] = {k: result.metrics.get(k) for k in ("balanced", "top1", "groups", "tau_norm")}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)


def _failed_before(study, method: str, text: str) -> Optional[str]:
    """The error of an earlier trial of the same setting that failed (it would fail again), else None."""
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if (a.get("method"), a.get("label")) == (method, text) and str(a.get("status", "")).startswith("failed"):
            return a["status"]
    return None


def _run(search: Search, trial, plan) -> Optional[TrialResult]:
    """The trial's runs; None when a run of it fails with ccar's own error (a diverging loss, a method that does
    not apply to this data), which the search records and goes past. A stop (signal, Ctrl-C) ends the session:
    the next one runs these settings first."""
    optuna = import_optuna()
    warm = len(finished(search.session.study)) >= max(len(search.methods), 5)  # every default has had its full run

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return warm and trial.should_prune()

    deadline = search.session.clock.deadline(search.reserve())
    try:
        return run_plan(plan, search.runs, report, deadline, search.score())
    except CCARError as exc:
        if getattr(exc, "exit_code", None):  # preempted (SIGTERM / SIGUSR1): its checkpoint is written
            trial.set_user_attr("status", "interrupted")
            search.session.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            search.session.save()
            raise
        trial.set_user_attr("status", f"failed: {exc}")
    except BaseException:
        trial.set_user_attr("status", "interrupted")
        search.session.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        search.session.save()
        raise
    return None


def run_trial(search: Search, trial) -> Optional[TrialResult]:
    """Sample the method and its knobs, run the trial, tell the study its value (or that it was pruned, or
    failed: None)."""
    optuna = import_optuna()
    study = search.session.study
    method = trial.suggest_categorical("method", list(search.methods))
    params = {k: trial.suggest_categorical(f"{method}/{k}", v) for k, v in search.methods[method].dims}
    plan = plan_trial(search.base, search.methods[method], params, search.runs)
    error = _failed_before(study, method, label(params))
    trial.set_user_attr("method", method)
    trial.set_user_attr("label", label(params))
    result = _run(search, trial, plan) if error is None else None
    if result is None:
        if error is not None:
            trial.set_user_attr("status", error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        search.session.save()
        return None
    value = None
    if result.metrics is not None:
        value = search.objective.score(result.metrics, read_record(result.model_dir)["class_counts"])
    _record(trial, result, value, method, params, search.session.clock.spent(), search.runs)
    if value is not None:
        study.tell(trial, value)
    else:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    search.session.save()
    return result


def _line(trial, result: Optional[TrialResult], study, left: float) -> str:
    a = trial.user_attrs
    best = best_trial(study)
    so_far = f"best {best.value:.2f} ({best.user_attrs['method']})" if best is not None else "best -"
    if result is None:
        return f"trial {trial.number:>3}  {a['method']:<12} {a['label']:<40} {a.get('status')}  | {so_far}"
    what = (f"val {a['value']:.2f}" if a.get("value") is not None else
            f"{result.status} after epoch {result.epochs}")
    reused = "" if result.trained else " (reused)"
    return (f"trial {trial.number:>3}  {a['method']:<12} {a['label']:<40} {what}  {fmt_time(result.seconds)}{reused}"
            f"  | {so_far}, {fmt_time(left)} left")


def _repeat(study, trial) -> bool:
    """Whether ``trial`` tried a setting that an earlier trial had already finished."""
    key = (trial.user_attrs.get("method"), trial.user_attrs.get("label"))
    return any(t.number < trial.number and t.user_attrs.get("status") == "complete"
               and (t.user_attrs.get("method"), t.user_attrs.get("label")) == key for t in finished(study))


def best_trial(study):
    optuna = import_optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def run_search(search: Search) -> str:
    """Trials until a stop condition; returns why it stopped."""
    enqueue_defaults(search)
    clock, study = search.session.clock, search.session.study
    bar = progress(int(clock.budget), True, "ccar tune", unit="s")
    bar.update(min(int(clock.spent()), int(clock.budget)))
    repeats = 0
    try:
        while True:
            why = _why_stop(search, repeats)
            if why is not None:
                return why
            trial = study.ask()
            result = run_trial(search, trial)
            repeated = result is None or _repeat(study, trial)
            repeats = repeats + 1 if repeated else 0
            if repeated:
                explore(search, trial)
            bar.update(max(0, min(int(clock.spent()), int(clock.budget)) - bar.n))
            best = best_trial(study)
            so_far = f", best {best.value:.1f} ({best.user_attrs['method']})" if best is not None else ""
            bar.set_postfix_str(f"trials {len(finished(study))}{so_far}, {fmt_time(clock.left())} left")
            bar.write(_line(trial, result, study, clock.left())) if not bar.disable else search.log(
                _line(trial, result, study, clock.left()))
    finally:
        bar.close()
