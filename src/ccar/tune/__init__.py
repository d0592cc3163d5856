"""``ccar tune``: which method for my data? A search over the strong, cheap long-tail methods and their knobs
(Optuna: TPE, a Hyperband pruner fed with per-epoch validation scores, a resumable SQLite study) within a
wall-clock budget, chosen on the validation split only; the top methods re-run over more seeds with paired
intervals; the test split scored once, for the winner. Every trial is an ordinary ccar run folder.

    ccar tune dataset=folder data_root=~/photos budget=15m
    ccar tune --config configs/default.yaml budget=1h objective=worst-class out=runs/tune

docs/tune.md describes the command and its study.
"""

from .command import run_tune
from .objective import Objective, parse_objective
from .options import TuneOptions, parse_budget, split_overrides

__all__ = ["Objective", "TuneOptions", "parse_budget", "parse_objective", "run_tune", "split_overrides"]
