"""``ccar sweep``'s driver: it expands the sweep file into cells, hands the ready ones to a launcher (local or
Slurm), is the only writer of ``results.jsonl``, and writes the report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from tqdm.auto import tqdm

from ..errors import ConfigError, TrainingError
from ..report.sweep_report import write_report
from .local import run_locally
from .packing import grouper, pack_size
from .results import read_results
from .spec import Cell, expand, load_sweep


def run_sweep(path: str, out: Optional[str] = None, jobs: Optional[int] = None, report_only: bool = False,
              log=print, launcher: str = "local", slurm=None) -> Path:
    """Run the sweep's missing cells, then write its report. ``launcher``: ``local`` (a process pool of ``jobs``
    workers on this machine) or ``slurm`` (one Slurm job per cell, :mod:`ccar.sweep.slurm`; ``slurm``: its
    :class:`~ccar.sweep.slurm.SlurmOptions`, ``jobs`` caps the cells queued at once)."""
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"unknown launcher {launcher!r}; valid: local, slurm")
    spec = load_sweep(path)
    folder = Path(out or spec.get("out") or Path("runs") / Path(path).stem)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    results_path = folder / "results.jsonl"
    failed: List[str] = []
    if not report_only:
        failed = _run_cells(path, spec, folder, results_path, jobs, launcher, slurm, log)
    rows = read_results(results_path)
    cells = {c.key for c in expand(spec, rows)}
    report = write_report(folder, spec, [r for r in rows if r["key"] in cells], source=path)  # runs the file still names
    log(f"report: {report}")
    if failed:
        raise TrainingError(f"{len(failed)} cell{'s' * (len(failed) > 1)} failed on Slurm ({failed[0]}"
                            f"{' ...' if len(failed) > 1 else ''}); why: {folder / 'slurm' / 'jobs.json'}; the report "
                            f"holds the others. Fix and rerun the same command: it runs only what is missing")
    return report


def _run_cells(path: str, spec: Dict[str, Any], folder: Path, results_path: Path, jobs: Optional[int],
               launcher: str, slurm, log) -> List[str]:
    """Run every missing cell with the launcher; returns the keys of the cells that failed (Slurm)."""
    runs_root = Path(spec.get("runs") or folder / "runs")
    if launcher == "slurm":
        from .slurm import SlurmOptions, check_cluster  # (submitit: an optional extra)

        slurm = slurm or SlurmOptions()
        slurm.max_jobs = jobs
        check_cluster(slurm.validate())  # before anything else: a one-line error, nothing submitted
    jobs = max(1, int(jobs or spec.get("jobs") or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    pending: list = []
    rows = read_results(results_path)
    cells = expand(spec, rows, pending)
    done = {r["key"] for r in rows}
    at_once = "on Slurm" if launcher == "slurm" else f"{jobs} at a time"
    log(f"sweep {path}: {len(cells) + len(pending)} runs, {sum(c.key in done for c in cells)} already done, "
        f"{at_once} -> {folder}")
    shared = [c for c in cells if c.shares]
    if shared:
        log(f"{len(shared)} of them train nothing new: the same model as an earlier cell (e.g. {shared[0].key} "
            f"reuses {shared[0].shares}); each is trained once")

    def ready(started: set) -> List[Cell]:  # cells not yet run, in sweep order; a tuned method's other seeds join
        rows = read_results(results_path)  # the queue as soon as its candidates have all run; a cell sharing
        done = {r["key"] for r in rows}  # another's training waits for that run
        return [c for c in expand(spec, rows) if c.key not in done and c.key not in started
                and (c.shares is None or c.shares in done)]

    def cell_args(cell: Cell) -> tuple:
        return (cell, str(runs_root / cell.key), threads, cell.shares and str(runs_root / cell.shares),
                str(runs_root / "features"))

    bar = tqdm(total=len(cells) + len(pending), initial=sum(c.key in done for c in cells), unit="run",
               dynamic_ncols=True)
    with open(results_path, "a") as sink, bar:  # (the bar closed before an error is printed)
        def record(row: Dict[str, Any]) -> None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            bar.update(1)
            bar.set_postfix_str(f"{row['key']}: top-1 {row['metrics']['top1']:.1f}")

        if launcher == "slurm":
            from .slurm import run_on_slurm

            return run_on_slurm(spec, folder, runs_root, results_path, slurm, ready, record,
                                tqdm.write if log is print else log)  # (lines above the progress bar)
        per_run = int(spec.get("gpus_per_run") or 1)
        run_locally(ready, record, cell_args, jobs, per_run, log, _packs(spec, launcher, per_run, log))
    return []


def _packs(spec: Dict[str, Any], launcher: str, per_run: int, log):
    """The launcher's ``group``: cells that can train as one program, packed (``pack`` in the sweep file)."""
    import torch

    size, why = pack_size(spec.get("pack"), launcher, torch.cuda.is_available())
    if size > 1 or spec.get("pack") not in (None, False, "off", 1):
        log(why)
    return grouper(size, per_run)
