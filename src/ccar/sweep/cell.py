"""One cell of a sweep: trained (both stages, for two-stage methods) in this process, a pool worker or a Slurm
job, into its run folder; the result is its line of ``results.jsonl``."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..config import apply_overrides, load_config, save_config, to_dict
from ..engine.retrain import retrain_config
from ..engine.train import train
from ..errors import CCARError, TrainingError
from ..report.sweep_report import hardware
from .results import read_results
from .spec import Cell


def run_cell(cell: Cell, run_dir: str, threads: int, shared_dir: Optional[str] = None,
             feature_dir: Optional[str] = None, nproc: int = 1) -> Dict[str, Any]:
    """Train one cell (in this process or a worker); returns its results line. ``shared_dir``: the finished run of
    the cell this one shares its training with (:attr:`Cell.shares`): a two-stage cell re-trains its classifier
    from it; a cell that differs only in evaluation settings is that run's final checkpoint, scored its own way.
    ``feature_dir``: where cells over one frozen backbone (finetune=linear) keep its features, computed once.
    ``nproc`` > 1: each stage runs under ``torchrun --standalone --nproc_per_node nproc`` (a multi-GPU cell)."""
    cfg, common = cell_config(cell, run_dir, threads, shared_dir, feature_dir)
    started = time.perf_counter()
    metrics = _finished(cfg)
    if metrics is None:
        metrics = _train_or_leave(cfg, _resumes(cfg), nproc)
    return _complete(cell, run_dir, cfg, metrics, common, nproc, started)


def run_pack(cells_args: List[tuple]) -> List[Dict[str, Any]]:
    """Train several cells (each ``cells_args`` entry: :func:`run_cell`'s arguments) as one pack
    (:mod:`ccar.engine.pack_train`); their results lines, in order. Finished cells are read back; the others
    continue from their checkpoints."""
    from ..engine.pack_train import train_pack

    prepared = [cell_config(*args[:5]) for args in cells_args]
    started = time.perf_counter()
    metrics = [_finished(cfg) for cfg, _ in prepared]
    todo = [i for i, m in enumerate(metrics) if m is None]
    try:
        trained = train_pack([prepared[i][0] for i in todo], [_resumes(prepared[i][0]) for i in todo],
                             log=lambda *_: None) if todo else []
    except CCARError as exc:
        _leave_on_signal(exc)
        raise
    for i, m in zip(todo, trained):
        metrics[i] = m
    rows = [_complete(args[0], args[1], cfg, m, common, 1, started)
            for args, (cfg, common), m in zip(cells_args, prepared, metrics)]
    share = (time.perf_counter() - started) / len(rows)
    for k, row in enumerate(rows):  # (each cell's share of the pack's time: the report sums them)
        row.update(wall_seconds=share, pack={"size": len(rows), "cell": k})
    return rows


def run_unit(cells_args: List[tuple]) -> List[Dict[str, Any]]:
    """What a launcher runs: one cell (:func:`run_cell`) or a pack of them (:func:`run_pack`); their rows."""
    return [run_cell(*cells_args[0])] if len(cells_args) == 1 else run_pack(cells_args)


def cell_config(cell: Cell, run_dir: str, threads: int, shared_dir: Optional[str] = None,
                feature_dir: Optional[str] = None):
    """The config of the cell's first stage (its run folder: ``run_dir``, or the shared run's), and the overrides
    every stage adds."""
    cfg = load_config(None, cell.overrides)
    first_dir = Path(shared_dir if shared_dir and cell.stage2 is not None else run_dir)
    features = [f"feature_cache={feature_dir}"] if feature_dir and not cfg.feature_cache else []
    common = ["progress=false"] + ([f"threads={threads}"] if threads else []) + features
    apply_overrides(cfg, [f"out={first_dir}"] + common)
    if shared_dir and cell.stage2 is None and not (first_dir / "checkpoint.safetensors").exists():
        first_dir.mkdir(parents=True, exist_ok=True)  # the shared run's last epoch: train() resumes past the loop
        shutil.copyfile(Path(shared_dir) / "checkpoint.safetensors", first_dir / "checkpoint.safetensors")
    return cfg, common


def _resumes(cfg) -> bool:
    return (cfg.run_dir() / "checkpoint.safetensors").exists()


def _finished(cfg) -> Optional[Dict[str, Any]]:
    """A finished first stage's metrics (a shared first stage, or one that finished before a crash), else None."""
    if _resumes(cfg) and (cfg.run_dir() / "metrics.json").exists():
        return json.loads((cfg.run_dir() / "metrics.json").read_text())
    return None


def _complete(cell: Cell, run_dir: str, cfg, metrics: Dict[str, Any], common: List[str], nproc: int,
              started: float) -> Dict[str, Any]:
    """The second stage of a two-stage cell (re-training the classifier of the first), then the results line."""
    first = None
    if cell.stage2 is not None:  # the second stage (classifier re-training) of the parent just trained
        first = metrics["top1"]
        method = next(o.split("=", 1)[1] for o in cell.stage2 if o.startswith("method="))
        out2 = f"{run_dir}-{method}"
        cfg = retrain_config(Path(cfg.run_dir()), cell.stage2 + [f"out={out2}"] + common)
        metrics = _train_or_leave(cfg, (Path(out2) / "checkpoint.safetensors").exists(), nproc)
    keep = ("top1", "balanced", "per_class", "many", "medium", "few", "groups", "ece", "val_top1", "val_balanced",
            "best_epoch", "epochs", "seconds", "class_counts", "bayes_balanced_accuracy", "test_agnostic",
            "test_agnostic_oracle", "test_agnostic_sade", "routing")
    return {"key": cell.key, "method": cell.method, "values": cell.values, "tuned": cell.tuned, "seed": cell.seed,
            "config": to_dict(cfg), "metrics": {k: metrics[k] for k in keep if k in metrics},
            "last": {k: metrics["last"][k] for k in ("top1", "balanced", "groups", "many", "medium", "few")},
            "history": _history(cfg.run_dir()),
            "wall_seconds": time.perf_counter() - started, "hardware": hardware(),
            **({"stage1_top1": first} if first is not None else {}),
            **({"trained_by": cell.shares} if cell.shares else {}),
            **({"tau_norm": metrics["tau_norm"]} if "tau_norm" in metrics else {})}


def _train_or_leave(cfg, resume: bool, nproc: int = 1) -> Dict[str, Any]:
    """Train a cell. Stopped by SIGTERM (the sweep stopping its workers, or a scheduler), a pool worker leaves once
    the run has written its mid-epoch checkpoint, instead of taking the next cell from the queue."""
    if nproc > 1:
        return _torchrun(cfg, resume, nproc)
    try:
        return train(cfg, resume=resume, log=lambda *_: None)
    except CCARError as exc:
        _leave_on_signal(exc)
        raise


def _leave_on_signal(exc: CCARError) -> None:
    if getattr(exc, "exit_code", None) and multiprocessing.parent_process() is not None:
        os._exit(exc.exit_code)


def _torchrun(cfg, resume: bool, nproc: int) -> Dict[str, Any]:
    """One stage of a multi-GPU cell: ``torchrun --standalone --nproc_per_node nproc -m ccar train`` on the cell's
    resolved config (written beside its run folder); its metrics.json once it has finished."""
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
