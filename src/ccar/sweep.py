"""``ccar sweep``: a grid of runs (methods x grid values x seeds), resumable, with an honest report.

A sweep file (YAML)::

    out: runs/sweep-fmnist          # sweep folder: results.jsonl, report.md, figures
    runs: runs/sweep-fmnist/runs    # one folder per run (default: <out>/runs); keep it out of git
    jobs: 1                         # runs at once (CPU threads are split between them; each its own GPU)
    gpus_per_run: 1                 # GPUs each of those runs sees (worker i: the i-th group of visible GPUs)
    base: {dataset: fashion-mnist-lt, epochs: 8}     # overrides shared by every run
    seeds: [0, 1, 2]
    grid: {imbalance: [100, 50, 10]}                 # cartesian product over these keys (a mapping value sets
                                                     # several keys together: synthetic: [{num_classes: 100, dim: 8}];
                                                     # `setting: [{name: A, dataset: csv, ...}]`: named settings)
    methods:                                          # name -> overrides
      CE: {loss.name: ce}
      CCAR-LA: {loss.name: ccar, loss.base: la}
      CE+cRT: {loss.name: ce, stage2: {method: crt, epochs: 10}}   # two stages as one cell (`ccar retrain`)
      LA: {loss.name: la, tune: {loss.tau: [0.5, 1.0, 1.5]}}       # a knob chosen on validation (below)
    studies:                                          # extra grids for some methods (e.g. an omega sweep)
      - {methods: [CCAR-LA], grid: {loss.omega: [0.5, 0.9], imbalance: [100]}}
    report: {per_class: [CE, CCAR-LA], knobs: {loss.omega: 0.75}, baselines: {CCAR-LA: LA}, last_epoch: true}

Tuning: a method's ``tune`` (a mapping of key -> candidate values, crossed, or a list of override mappings) is
tried on the first seed only; the candidate with the best balanced accuracy on that seed's validation split is then
run on the other seeds (:func:`chosen_candidate`, the test split plays no part). Give every method a grid of the
same size for an equal tuning budget. Rows record the candidate in ``tuned``.

Each finished run appends one line to ``results.jsonl`` (written by this process only, so concurrent runs never
mix); an interrupted sweep skips finished cells and resumes a half-finished run from its checkpoint.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .engine.config import load_yaml
from .errors import CCARError, ConfigError, TrainingError
from .tuning import chosen_candidate, flatten, tune_candidates

SWEEP_KEYS = ("out", "runs", "jobs", "gpus_per_run", "base", "seeds", "grid", "methods", "studies", "report")
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
    from .engine.decoupling import RETRAIN_METHODS

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
    from .engine.config import load_config, to_dict

    resolved = to_dict(load_config(None, list(overrides)))
    for key in EVAL_ONLY + ("out", "progress", "threads", "feature_cache"):
        resolved.pop(key)
    return json.dumps(resolved, sort_keys=True)


def _run_cell(cell: Cell, run_dir: str, threads: int, shared_dir: Optional[str] = None,
              feature_dir: Optional[str] = None, nproc: int = 1) -> Dict[str, Any]:
    """Train one cell (in this process or a worker); returns its results line. ``shared_dir``: the finished run of
    the cell this one shares its training with (:attr:`Cell.shares`): a two-stage cell re-trains its classifier
    from it; a cell that differs only in evaluation settings is that run's final checkpoint, scored its own way.
    ``feature_dir``: where cells over one frozen backbone (finetune=linear) keep its features, computed once.
    ``nproc`` > 1: each stage runs under ``torchrun --standalone --nproc_per_node nproc`` (a multi-GPU cell)."""
    from .engine.config import apply_overrides, load_config, to_dict
    from .report.sweep_report import hardware

    cfg = load_config(None, cell.overrides)
    first_dir = Path(shared_dir if shared_dir and cell.stage2 is not None else run_dir)
    features = [f"feature_cache={feature_dir}"] if feature_dir and not cfg.feature_cache else []
    common = ["progress=false"] + ([f"threads={threads}"] if threads else []) + features
    apply_overrides(cfg, [f"out={first_dir}"] + common)
    if shared_dir and cell.stage2 is None and not (first_dir / "checkpoint.safetensors").exists():
        first_dir.mkdir(parents=True, exist_ok=True)  # the shared run's last epoch: train() resumes past the loop
        shutil.copyfile(Path(shared_dir) / "checkpoint.safetensors", first_dir / "checkpoint.safetensors")
    resume = (first_dir / "checkpoint.safetensors").exists()
    started = time.perf_counter()
    if resume and (first_dir / "metrics.json").exists():  # finished (a shared first stage, or one before a crash)
        metrics = json.loads((first_dir / "metrics.json").read_text())
    else:
        metrics = _train_or_leave(cfg, resume, nproc)
    first = None
    if cell.stage2 is not None:  # the second stage (classifier re-training) of the parent just trained
        from .engine.retrain import retrain_config

        first = metrics["top1"]
        method = next(o.split("=", 1)[1] for o in cell.stage2 if o.startswith("method="))
        out2 = f"{run_dir}-{method}"
        cfg = retrain_config(first_dir, cell.stage2 + [f"out={out2}"] + common)
        metrics = _train_or_leave(cfg, (Path(out2) / "checkpoint.safetensors").exists(), nproc)
    keep = ("top1", "balanced", "per_class", "many", "medium", "few", "groups", "ece", "val_top1", "val_balanced",
            "best_epoch", "epochs", "seconds", "class_counts", "bayes_balanced_accuracy", "test_agnostic",
            "test_agnostic_oracle")
    return {"key": cell.key, "method": cell.method, "values": cell.values, "tuned": cell.tuned, "seed": cell.seed,
            "config": to_dict(cfg), "metrics": {k: metrics[k] for k in keep if k in metrics},
            "last": {k: metrics["last"][k] for k in ("top1", "balanced", "groups", "many", "medium", "few")},
            "history": _history(cfg.run_dir()),
            "wall_seconds": time.perf_counter() - started, "hardware": hardware(), **({"stage1_top1": first} if first is not None else {}),
            **({"trained_by": cell.shares} if cell.shares else {}),
            **({"tau_norm": metrics["tau_norm"]} if "tau_norm" in metrics else {})}


def _train_or_leave(cfg, resume: bool, nproc: int = 1) -> Dict[str, Any]:
    """Train a cell. Stopped by SIGTERM (the sweep stopping its workers, or a scheduler), a pool worker leaves once
    the run has written its mid-epoch checkpoint, instead of taking the next cell from the queue."""
    from .engine.train import train

    if nproc > 1:
        return _torchrun(cfg, resume, nproc)
    try:
        return train(cfg, resume=resume, log=lambda *_: None)
    except CCARError as exc:
        if getattr(exc, "exit_code", None) and multiprocessing.parent_process() is not None:
            os._exit(exc.exit_code)
        raise


def _torchrun(cfg, resume: bool, nproc: int) -> Dict[str, Any]:
    """One stage of a multi-GPU cell: ``torchrun --standalone --nproc_per_node nproc -m ccar train`` on the cell's
    resolved config (written beside its run folder); its metrics.json once it has finished."""
    import subprocess
    import sys

    from .engine.config import save_config

    run_dir = Path(cfg.run_dir())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    launch = run_dir.parent / f"{run_dir.name}.launch.yaml"
    save_config(cfg, launch)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ccar", "train", "--config", str(launch)] + (["--resume"] if resume else [])
    done = subprocess.run(cmd)
    if done.returncode != 0:  # (a stop by a signal, or a lost process: the next try resumes from the checkpoint)
        error = TrainingError(f"{run_dir}: torchrun ({nproc} processes) exited with status {done.returncode}")
        error.exit_code = done.returncode
        raise error
    return json.loads((run_dir / "metrics.json").read_text())


def _history(run_dir: Path) -> List[Dict[str, Any]]:
    """The per-epoch curve of a run (training loss and accuracy, validation accuracy), for convergence plots."""
    rows = read_results(Path(run_dir) / "log.jsonl")
    return [{k: h.get(k) for k in ("epoch", "loss", "train_top1", "val_top1", "val_balanced")} for h in rows]


def read_results(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that cell simply runs again
    return rows


def visible_gpus() -> List[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (its value, else 0..count-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # (NVML: does not initialise CUDA here)


def worker_gpus(worker: int, gpus: List[str], per_run: int = 1) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for sweep worker ``worker``: its own ``per_run`` GPUs, round-robin over ``gpus``
    (None without GPUs: the worker runs on the CPU).

    >>> [worker_gpus(i, ["0", "1", "2", "3"]) for i in range(5)], worker_gpus(1, ["0", "1", "2", "3"], 2)
    (['0', '1', '2', '3', '0'], '2,3')
    """
    if not gpus:
        return None
    groups = max(1, len(gpus) // per_run)
    start = (worker % groups) * per_run
    return ",".join(gpus[start:start + per_run])


def _init_worker(counter, gpus: List[str], per_run: int) -> None:
    """Pool initialiser (before the worker touches CUDA): take the next worker number, see only its GPUs."""
    with counter.get_lock():
        worker, counter.value = counter.value, counter.value + 1
    devices = worker_gpus(worker, gpus, per_run)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices


@contextlib.contextmanager
def _workers_stop_with_us():
    """A SIGTERM to the sweep (``kill PID``) also stops its pool workers. Ctrl-C reaches them through the process
    group, but a plain ``kill`` reaches this process only, and the workers would go on training their cells — into
    the same run folders a restarted sweep resumes. A stopped run keeps its last per-epoch checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for child in multiprocessing.active_children():
            child.terminate()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(path: str, out: Optional[str] = None, jobs: Optional[int] = None, report_only: bool = False,
              log=print, launcher: str = "local", slurm=None) -> Path:
    """Run the sweep's missing cells, then write its report. ``launcher``: ``local`` (a process pool of ``jobs``
    workers on this machine) or ``slurm`` (one Slurm job per cell, :mod:`ccar.slurm`; ``slurm``: its
    :class:`~ccar.slurm.SlurmOptions`, ``jobs`` caps the cells queued at once)."""
    from tqdm.auto import tqdm

    from .report.sweep_report import write_report

    if launcher not in ("local", "slurm"):
        raise ConfigError(f"unknown launcher {launcher!r}; valid: local, slurm")
    spec = load_sweep(path)
    folder = Path(out or spec.get("out") or Path("runs") / Path(path).stem)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    results_path = folder / "results.jsonl"
    runs_root = Path(spec.get("runs") or folder / "runs")
    failed: List[str] = []
    if not report_only:
        if launcher == "slurm":
            from .slurm import SlurmOptions, check_cluster

            slurm = slurm or SlurmOptions()
            slurm.max_jobs = jobs
            check_cluster(slurm.validate())  # before anything else: a one-line error, nothing submitted
        jobs = max(1, int(jobs or spec.get("jobs") or 1))
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
        pending: list = []
        rows = read_results(results_path)
        cells = expand(spec, rows, pending)
        done = {r["key"] for r in rows}
        n_done = sum(c.key in done for c in cells)
        at_once = "on Slurm" if launcher == "slurm" else f"{jobs} at a time"
        log(f"sweep {path}: {len(cells) + len(pending)} runs, {n_done} already done, {at_once} -> {folder}")
        shared = [c for c in cells if c.shares]
        if shared:
            log(f"{len(shared)} of them train nothing new: the same model as an earlier cell (e.g. {shared[0].key} "
                f"reuses {shared[0].shares}); each is trained once")
        bar = tqdm(total=len(cells) + len(pending), initial=n_done, unit="run", dynamic_ncols=True)
        with open(results_path, "a") as sink, bar:  # (the bar closed before an error is printed)
            def record(row):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                bar.update(1)
                bar.set_postfix_str(f"{row['key']}: top-1 {row['metrics']['top1']:.1f}")

            def ready(started):  # cells not yet run, in sweep order; a tuned method's other seeds join the
                rows = read_results(results_path)  # queue as soon as its candidates have all run
                done = {r["key"] for r in rows}  # a cell sharing another's training waits for that run
                return [c for c in expand(spec, rows) if c.key not in done and c.key not in started
                        and (c.shares is None or c.shares in done)]

            def cell_args(cell):
                return (cell, str(runs_root / cell.key), threads, cell.shares and str(runs_root / cell.shares),
                        str(runs_root / "features"))

            started: set = set()
            if launcher == "slurm":
                from .slurm import run_on_slurm

                failed = run_on_slurm(spec, folder, runs_root, results_path, slurm, ready, record,
                                      tqdm.write if log is print else log)  # (lines above the progress bar)
            elif jobs == 1:
                while True:
                    todo = ready(started)
                    if not todo:
                        break
                    started.add(todo[0].key)
                    record(_run_cell(*cell_args(todo[0])))
            else:
                ctx = multiprocessing.get_context("spawn")
                per_run = int(spec.get("gpus_per_run") or 1)
                gpus = visible_gpus()
                if gpus:
                    log(f"GPUs {','.join(gpus)}: each of the {jobs} workers sees {per_run} of them (round-robin)")
                init = (_init_worker, (ctx.Value("i", 0), gpus, per_run))
                with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=init[0], initargs=init[1]) as pool, \
                        _workers_stop_with_us():
                    running: set = set()
                    while True:
                        for cell in ready(started)[: jobs - len(running)]:
                            started.add(cell.key)
                            running.add(pool.submit(_run_cell, *cell_args(cell)))
                        if not running:
                            break
                        finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                        for fut in finished:
                            record(fut.result())
    rows = read_results(results_path)
    cells = {c.key for c in expand(spec, rows)}
    report = write_report(folder, spec, [r for r in rows if r["key"] in cells], source=path)  # runs the file still names
    log(f"report: {report}")
    if failed:
        raise TrainingError(f"{len(failed)} cell{'s' * (len(failed) > 1)} failed on Slurm ({failed[0]}"
                            f"{' ...' if len(failed) > 1 else ''}); why: {folder / 'slurm' / 'jobs.json'}; the report "
                            f"holds the others. Fix and rerun the same command: it runs only what is missing")
    return report
