"""What one ``ccar tune`` folder holds across sessions: the Optuna study (SQLite, ``study.db``), the budget spent
so far (``state.json``), and the clock of this session. Rerunning the same command opens the same study and
continues with the budget that is left; a trial that a stop interrupted is tried again first, and its run folder
continues from its last checkpoint."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from ..config import TrainConfig, to_dict
from ..errors import ConfigError
from .candidates import Method
from .options import TuneOptions
from .plan import NOT_TRAINING

STATE = "state.json"


def import_optuna():
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError("ccar tune needs optuna: pip install 'ccar[tune]' (or pip install optuna)") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def study_key(base: TrainConfig, options: TuneOptions, methods: Dict[str, Method]) -> str:
    """What makes two ``ccar tune`` commands the same search: the run settings, the objective, the candidates and
    their knobs, the pruner (not the budget: rerun with a larger one to search longer)."""
    resolved = to_dict(base)
    for key in NOT_TRAINING:
        resolved.pop(key, None)
    ident = {"config": resolved, "objective": options.objective.describe(), "pruner": options.pruner,
             "methods": {n: [m.fixed, m.stage2, m.dims, m.choices] for n, m in methods.items()}}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Clock:
    """The budget: ``spent_before`` seconds of earlier sessions plus this session's wall-clock."""

    budget: float
    spent_before: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def left(self) -> float:
        return self.budget - self.spent()

    def deadline(self, reserve: float = 0.0) -> float:
        """The ``time.monotonic()`` at which the budget, less ``reserve`` seconds, is spent."""
        return time.monotonic() + self.left() - reserve


def make_pruner(optuna, name: str, epochs: int, stage2_epochs: int):
    """Hyperband (default) or successive halving over epochs (a second stage's epochs follow its first's), or
    none."""
    if name == "none":
        return optuna.pruners.NopPruner()
    min_resource = max(1, epochs // 8)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=max(epochs + stage2_epochs,
                                                                                       min_resource + 1),
                                          reduction_factor=3)


@dataclass
class Session:
    """A tune folder opened: its study, its clock, and ``state.json``'s other records."""

    folder: Path
    study: Any
    clock: Clock
    state: Dict[str, Any]

    def save(self) -> None:
        self.state["spent"] = self.clock.spent()
        (self.folder / STATE).write_text(json.dumps(self.state, indent=1))


def open_session(folder: Path, key: str, options: TuneOptions, seed: int, epochs: int, stage2_epochs: int) -> Session:
    """The tune folder's study (created, or loaded to resume) and the budget left in it."""
    optuna = import_optuna()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("study") not in (None, f"tune-{key}"):  # another search in this folder: its own budget
        state = {"previous": state.get("study")}
    state["study"] = f"tune-{key}"
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name=state["study"],
                                direction="maximize", load_if_exists=True, sampler=sampler,
                                pruner=make_pruner(optuna, options.pruner, epochs, stage2_epochs))
    session = Session(folder, study, Clock(options.budget, float(state.get("spent", 0.0))), state)
    requeue_interrupted(session)
    return session


def requeue_interrupted(session: Session) -> List[int]:
    """Trials a stop interrupted (left running by a killed process, or marked interrupted) are ended as failed
    and their settings queued to run first; their run folders continue from their checkpoints."""
    optuna = import_optuna()
    done = set(session.state.get("requeued", []))
    queued = []
    for trial in session.study.get_trials(deepcopy=False):
        running = trial.state == optuna.trial.TrialState.RUNNING
        if trial.number in done or not (running or trial.user_attrs.get("status") == "interrupted"):
            continue
        if running:
            session.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        session.study.enqueue_trial(trial.params)
        queued.append(trial.number)
    session.state["requeued"] = sorted(done | set(queued))
    return queued
