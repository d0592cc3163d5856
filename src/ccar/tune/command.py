"""``ccar tune``, top to bottom: the options and the run settings, the candidates, the study (resumed if the folder
has one), the search on the validation split, the top methods over more seeds, then -- the winner fixed -- its
run folder copied to ``winner/`` and the test split scored once, with ``ccar eval``'s own function."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from ..config import TrainConfig, load_config, to_dict
from ..engine.build import dataset_from_config
from ..engine.evaluate_run import evaluate_run
from ..engine.runtime import fmt_time
from ..errors import CCARError, ConfigError, TrainingError
from ..sweep.spec import load_sweep
from ..tuning import flatten
from .candidates import load_methods
from .confirm import confirm, final_model
from .options import TuneOptions, describe, split_overrides
from .plan import _as_override
from .report import fmt_value, leaderboard, per_class_table, search_figure, write_leaderboard, write_trials
from .search import Search, run_search
from .session import open_session, study_key


def base_config(config: Optional[str], options: TuneOptions, rest: Sequence[str]) -> TrainConfig:
    """The run settings every trial starts from: a sweep file's ``base`` (``candidates=FILE``), the ``--config``
    file, then the ``key=value`` items."""
    sweep_base = []
    if options.candidates_file:
        sweep_base = [_as_override(k, v) for k, v in flatten("", load_sweep(options.candidates_file).get("base")
                                                                 or {}).items()]
    cfg = load_config(config, sweep_base + list(rest))
    if cfg.val_fraction <= 0:
        raise ConfigError("ccar tune chooses on the validation split: val_fraction must be > 0 (e.g. 0.1)")
    if options.out is None:
        options.out = Path("runs") / ("tune-" + cfg.dataset + (f"-{Path(cfg.data_root).name}" if cfg.data_root else ""))
    if cfg.feature_cache is None:  # a frozen backbone's features, computed once for every trial
        cfg.feature_cache = str(options.out / "features")
    return cfg


def winner_folder(model_dir: Path, evals: Dict[str, Any], target: Path) -> Path:
    """The winner's run folder as ``target``: its files (not its checkpoint) and its config with the method's
    evaluation settings (tau-norm, post-hoc LA) and its new place, ready for ``ccar predict`` and ``ccar eval``."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("checkpoint.safetensors", "tb"))
    text = (model_dir / "config.yaml").read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    cfg = load_config(str(model_dir / "config.yaml"), [_as_override(k, v) for k, v in evals.items()])
    cfg.out = str(target)
    (target / "config.yaml").write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return target


def score_winner(search: Search, result: Dict[str, Any], data) -> Dict[str, Any]:
    """The winner's folder and its test scores: computed once (a rerun of a finished tune reads them back)."""
    state = search.session.state
    key = json.dumps([result["winner"], result["winner_params"], result["winner_seed"]], sort_keys=True)
    target = search.session.folder / "winner"
    if state.get("winner_key") == key and "test" in state and (target / "best.safetensors").is_file():
        return state["test"]
    model_dir, _, evals = final_model(search, result["winner"], result["winner_params"], result["winner_seed"])
    winner_folder(model_dir, evals, target)
    scored = evaluate_run(target)  # the first and only time the test split is scored
    metrics, counts = scored["metrics"], json.loads((target / "data.json").read_text())["class_counts"]
    test = {"objective": search.objective.score(metrics, counts), **{k: metrics.get(k) for k in (
        "top1", "balanced", "many", "medium", "few", "groups", "ece", "test_agnostic", "tau_norm")},
        "per_class": dict(zip(data.class_names, metrics["per_class"])), "file": str(scored["path"]),
        "table": scored["table"]}
    state["winner_key"], state["test"] = key, test
    search.session.save()
    return test


def _seed_lines(result: Dict[str, Any]) -> str:
    lines = []
    for row in result.get("rows", []):
        lines.append(f"  {row['method']:<12} {row['label']:<40} val {row['mean']:.2f} ± {row['std']:.2f} over "
                     f"{row['n']} seed{'s' * (row['n'] != 1)}")
    for c in result.get("comparisons", []):
        if c["low"] is None:
            lines.append(f"  {c['winner']} − {c['other']}: {c['mean']:+.2f} (one seed: no interval)")
            continue
        verdict = ("ahead: the interval excludes 0" if c["verdict"] == "helps" else
                   "behind: the interval excludes 0" if c["verdict"] == "hurts" else "no clear difference")
        lines.append(f"  {c['winner']} − {c['other']}: {c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] "
                     f"(95 % paired interval over {c['n']} seeds, validation; {verdict})")
    return "\n".join(lines)


def write_outputs(search: Search, options: TuneOptions, why: str, result: Dict[str, Any], data,
                  test: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """leaderboard.md/.csv, trials.csv, search.png and tune.json; returns the summary and prints it."""
    folder, study = search.session.folder, search.session.study
    rows = leaderboard(study, list(search.methods), result)
    table = write_leaderboard(folder, rows, options.objective.describe())
    trials = write_trials(folder, study)
    figure = search_figure(folder, trials, options.objective.describe())
    summary = {"options": describe(options), "study": search.session.state["study"],
               "spent_seconds": search.session.clock.spent(), "stopped": why, "trials": len(trials),
               "data": {"summary": data.summary(), "class_names": data.class_names, "class_counts": data.class_counts},
               "leaderboard": rows, "seeds": result, "winner": None if result["winner"] is None else {
                   "method": result["winner"], "params": result["winner_params"], "seed": result["winner_seed"],
                   "folder": str(folder / "winner")}, "test": test and {k: v for k, v in test.items() if k != "table"},
               "figure": str(figure) if figure else None}
    (folder / "tune.json").write_text(json.dumps(summary, indent=1))
    log = search.log
    log(f"\n{len(trials)} trials, {fmt_time(summary['spent_seconds'])} of {fmt_time(options.budget)} spent; the search "
        f"stopped: {why}\nleaderboard (validation {options.objective.describe()}, %):\n{table}")
    if result.get("rows"):
        log(f"top {len(result['rows'])} over seeds {result['seeds']}:\n{_seed_lines(result)}")
    return summary


def run_tune(config: Optional[str], overrides: Sequence[str], log=print) -> Dict[str, Any]:
    """``ccar tune [--config FILE] key=value ...``; returns the summary written to ``tune.json``."""
    options, rest = split_overrides(overrides)
    cfg = base_config(config, options, rest)
    methods, _ = load_methods(cfg.epochs, cfg.finetune == "linear", options.candidates, options.candidates_file)
    data = dataset_from_config(copy.deepcopy(cfg))
    options.objective.check(data.num_classes)
    stage2_epochs = max([max(1, round(cfg.epochs / 4))] + [int(m.stage2.get("epochs", 0)) for m in methods.values()
                                                          if m.stage2])
    session = open_session(options.out, study_key(cfg, options, methods), options, cfg.seed, cfg.epochs,
                           stage2_epochs)
    search = Search(session, cfg, methods, options.objective, options.out / "runs", options.trials,
                    min(options.top, len(methods)) * (options.seeds - 1), log)
    log(f"ccar tune: {len(methods)} candidates ({', '.join(methods)}), objective {options.objective.describe()} on the "
        f"validation split, budget {fmt_time(options.budget)} ({fmt_time(session.clock.left())} left) -> {options.out}\n"
        f"{data.summary()}")
    try:
        why = run_search(search)
    except CCARError as exc:  # a stop signal: the trial's checkpoint is written
        if getattr(exc, "exit_code", None):
            exc.args = (f"{exc.args[0].split(';')[0]}; rerun the same command to continue the search",)
        raise
    log(f"search stopped: {why}")
    result = confirm(search, options.top, options.seeds)
    if result["winner"] is None:
        write_outputs(search, options, why, result, data, None)
        raise TrainingError(f"no candidate finished within budget={fmt_time(options.budget)}; raise the budget (the "
                            f"trials so far are kept: rerun the same command with a larger budget)")
    test = score_winner(search, result, data)
    summary = write_outputs(search, options, why, result, data, test)
    log(f"winner: {result['winner']} ({result['rows'][0]['label']}), seed {result['winner_seed']} -> "
        f"{options.out / 'winner'}\ntest split, scored once:\n{test['table']}\n"
        f"test {options.objective.describe()}: {fmt_value(test['objective'])}\n"
        f"{per_class_table(data.class_names, data.class_counts, list(test['per_class'].values()))}")
    return summary
