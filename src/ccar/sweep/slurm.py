"""``ccar sweep FILE --launcher slurm``: the sweep's cells as Slurm jobs, submitted through ``submitit``.

The sweep folder (on a filesystem the cluster's nodes share) stays the single truth:

- each job trains one cell into its run folder and writes its results line to ``slurm/rows/<cell>.json``; this
  process, the sweep's driver, is the only writer of ``results.jsonl`` (it appends each row as it arrives);
- ``slurm/jobs.json`` records the job of every submitted cell, so a rerun of the same command (after the driver
  was stopped, or on another login node) waits for the jobs still queued or running instead of submitting them
  again, collects those that finished meanwhile, and submits only what is missing: a cell is never run twice;
- a job that ends without its row (cancelled with ``scancel``, a killed process, a node failure, the time limit)
  is submitted again, up to ``--max-retries`` times, and continues from its run's checkpoint; a job that Slurm
  itself requeues (preemption) keeps its id and is waited for. A cell whose settings are wrong fails once, not
  ``max_retries`` times (the job writes why to ``slurm/rows/<cell>.error.json``);
- jobs get SIGUSR1 two minutes before their time limit (``--signal=USR1@120``): the run stops after its current
  step with a mid-epoch checkpoint, and the next job continues from it.

Cells are submitted as they become ready, each batch one job array: tuning candidates first, then the chosen
candidate's other seeds, as the local pool does; a cell that reuses another's training waits for it. A cell with
``gpus_per_run`` K > 1 runs ``torchrun --standalone --nproc_per_node K`` inside its job.

Job states come from ``squeue`` and ``scontrol show job`` (no accounting database needed; ``sacct`` is not used).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..engine.checkpoint import atomic_write
from ..errors import CCARError, ConfigError
from .cell import run_cell
from .results import read_results

# Job states in which a job may still run (or run again): the driver waits for it rather than submitting anew.
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
SIGNAL = "USR1@120"  # ccar's runs checkpoint on SIGUSR1 (and SIGTERM); two minutes before the time limit


class SlurmError(CCARError):
    """Slurm cannot take the sweep (not installed, controller down, unknown partition, sbatch refused)."""


@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    time: int = 60  # minutes per job
    cpus_per_run: int = 4
    gpus_per_run: Optional[int] = None  # None: the sweep file's gpus_per_run, else 0
    mem: Optional[str] = None  # e.g. 32G
    max_retries: int = 3  # re-submissions of a cell whose job ended without its result
    max_jobs: Optional[int] = None  # cells queued or running at once (None: no cap; the scheduler decides)
    sbatch: Dict[str, str] = field(default_factory=dict)  # any other sbatch option: account, qos, constraint, ...
    poll: float = 10.0  # seconds between looks at the queue

    def validate(self) -> "SlurmOptions":
        if self.poll <= 0:
            raise ConfigError(f"--poll must be more than 0 seconds, got {self.poll}")
        for name in ("time", "cpus_per_run"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise ConfigError(f"--gpus-per-run must be 0 or more, got {self.gpus_per_run}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.max_jobs}")
        return self


def parse_sbatch(items: List[str]) -> Dict[str, str]:
    """``--sbatch account=abc --sbatch qos=high`` -> {"account": "abc", "qos": "high"}.

    >>> parse_sbatch(["account=abc", "exclusive"])
    {'account': 'abc', 'exclusive': True}
    """
    out: Dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--sbatch {item!r}: give an sbatch option as NAME=VALUE (or NAME for a flag)")
        out[key] = value if eq else True
    return out


def _run(cmd: List[str], timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f} s: is the Slurm controller reachable?")


def check_cluster(opts: SlurmOptions) -> List[str]:
    """Everything that can be checked before a job is submitted; returns the cluster's partitions."""
    try:
        importlib.import_module("submitit")
    except ImportError:
        raise SlurmError("--launcher slurm needs submitit: pip install 'ccar[slurm]' (or pip install submitit)")
    missing = [c for c in ("sbatch", "squeue", "scontrol", "sinfo", "scancel") if shutil.which(c) is None]
    if missing:
        raise SlurmError(f"Slurm's commands are not on PATH ({', '.join(missing)} missing): run the sweep on a "
                         f"login node of the cluster (or start the local one: scripts/local-slurm.sh start)")
    ping = _run(["scontrol", "ping"])
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = [ln for ln in (ping.stdout + ping.stderr).splitlines() if ln.strip() and not ln.startswith("**")]
        raise SlurmError(f"the Slurm controller does not answer (scontrol ping: {said[0] if said else 'no output'})")
    info = _run(["sinfo", "-h", "-o", "%P"])
    partitions = [p.strip() for p in info.stdout.split() if p.strip()]
    names = [p.rstrip("*") for p in partitions]
    if opts.partition is not None and opts.partition not in names:
        raise SlurmError(f"Slurm partition {opts.partition!r} does not exist; partitions: "
                         f"{', '.join(partitions) or '(none)'} (* marks the default)")
    if opts.partition is None and not any(p.endswith("*") for p in partitions):
        raise SlurmError(f"this cluster has no default partition: pass --partition (one of {', '.join(names)})")
    return names


def cell_file(rows_dir: Path, key: str) -> Path:
    """Where a cell's job leaves its results line (a cell key holds '/' and '='; the file name is its hash)."""
    return rows_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def cell_job(cell, run_dir: str, threads: int, shared_dir: Optional[str], feature_dir: Optional[str],
             row_path: str, nproc: int = 1) -> str:
    """What one Slurm job runs (in the job, unpickled by submitit): train the cell, leave its row for the driver."""
    row_file = Path(row_path)
    try:
        row = run_cell(cell, run_dir, threads, shared_dir, feature_dir, nproc=nproc)
    except CCARError as exc:
        if not getattr(exc, "exit_code", None):  # a mistake in the cell's settings: another try would fail alike
            said = json.dumps({"key": cell.key, "error": str(exc)})
            atomic_write(row_file.with_suffix(".error.json"), lambda tmp: Path(tmp).write_text(said))
        raise
    row["slurm_job"] = os.environ.get("SLURM_JOB_ID")
    atomic_write(row_file, lambda tmp: Path(tmp).write_text(json.dumps(row)))
    return cell.key


class Ledger:
    """``slurm/jobs.json``: cell key -> {"jobs": [job ids, latest last], "state": running|done|failed, "why"}."""

    def __init__(self, path: Path):
        self.path = path
        self.cells: Dict[str, Dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(self.cells, indent=1)))

    def running(self) -> Dict[str, Dict[str, Any]]:
        return {k: v for k, v in self.cells.items() if v["state"] == "running"}


def queue_states(job_ids: List[str]) -> Optional[Dict[str, str]]:
    """The state of each job that may still run, from ``squeue`` (and ``scontrol show job`` for those squeue no
    longer lists: a requeued job can be missing from squeue for a moment). None when Slurm did not answer."""
    if not job_ids:
        return {}
    listed = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-u", _user()])
    if listed.returncode != 0:
        return None
    states = dict(line.split("|", 1) for line in listed.stdout.split() if "|" in line)
    out = {}
    for job in job_ids:
        state = states.get(job)
        if state is None:
            shown = _run(["scontrol", "show", "job", job])
            fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f) if shown.returncode == 0 else {}
            state = fields.get("JobState", "GONE")
        out[job] = state
    return out


def _user() -> str:
    import getpass

    return getpass.getuser()


def _why_failed(log_dir: Path, job: str) -> str:
    """The error a job's log ends with (submitit writes the exception there), else its last line."""
    err = log_dir / f"{job}_0_log.err"
    if not err.exists():
        return f"no log ({err})"
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Preempted|Interrupt)\b.*:", ln)]
    return ((errors or lines or ["empty log"])[-1]) + f" (log: {err})"


def make_executor(log_dir: Path, opts: SlurmOptions, name: str, gpus: int):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(log_dir), max_num_timeout=0)
    extra = {"signal": SIGNAL, "requeue": True, **opts.sbatch}
    if opts.mem:
        extra["mem"] = opts.mem
    executor.update_parameters(job_name=name, time=opts.time, cpus_per_task=opts.cpus_per_run, ntasks_per_node=1,
                               nodes=1, array_parallelism=opts.max_jobs or 1000, additional_parameters=extra,
                               **({"partition": opts.partition} if opts.partition else {}),
                               **({"gpus_per_node": gpus} if gpus else {}))
    return executor


def run_on_slurm(spec: Dict[str, Any], folder: Path, runs_root: Path, results_path: Path, opts: SlurmOptions,
                 ready: Callable[[set], list], record: Callable[[Dict[str, Any]], None], log=print) -> List[str]:
    """Submit the sweep's ready cells and collect their rows until none is left; returns the failed cells' keys
    (with why, in ``slurm/jobs.json``). ``ready(started)``: the cells not yet run and not in ``started``. The
    caller has checked the cluster (:func:`check_cluster`)."""
    gpus = opts.gpus_per_run if opts.gpus_per_run is not None else int(spec.get("gpus_per_run") or 0)
    nproc = max(1, gpus)
    threads = max(1, opts.cpus_per_run // nproc)
    slurm_dir = folder / "slurm"
    rows_dir, log_dir = slurm_dir / "rows", slurm_dir / "logs"
    rows_dir.mkdir(parents=True, exist_ok=True)
    name = f"ccar-{folder.name}"
    executor = make_executor(log_dir, opts, name, gpus)
    ledger = Ledger(slurm_dir / "jobs.json")
    for entry in ledger.cells.values():  # a rerun gives the cells that failed before a fresh budget
        if entry["state"] == "failed":
            entry.update(state="retry", tries=0)
    done = {r["key"] for r in read_results(results_path)}
    where = f"partition {opts.partition or '(default)'}, {opts.cpus_per_run} CPUs" + (f", {gpus} GPUs" if gpus else "")
    log(f"launcher slurm: each cell one job ({where}, {opts.time} min; torchrun x{nproc} inside) named {name}; "
        f"logs in {log_dir}")
    args = {}

    def submit(cells: list) -> None:
        jobs = []
        with executor.batch():
            for cell in cells:
                args[cell.key] = (cell, str(runs_root / cell.key), threads, cell.shares and str(runs_root / cell.shares),
                                  str(runs_root / "features"), str(cell_file(rows_dir, cell.key)), nproc)
                jobs.append(executor.submit(cell_job, *args[cell.key]))
        for cell, job in zip(cells, jobs):
            entry = ledger.cells.setdefault(cell.key, {"jobs": [], "tries": 0})
            entry["jobs"].append(job.job_id)
            entry.update(state="running", tries=entry.get("tries", 0) + 1)
        ledger.save()
        first = jobs[0].job_id.split("_")[0]
        log(f"submitted {len(cells)} cell{'s' * (len(cells) > 1)} as Slurm job {first}"
            + (f" ({cells[0].key}{' ...' if len(cells) > 1 else ''})" if cells else ""))

    def safely(cells: list) -> None:
        try:
            submit(cells)
        except CCARError:
            raise
        except Exception as exc:  # sbatch refused (a bad option, no such account, GPUs on a CPU partition, ...)
            said = str(getattr(exc, "stderr", None) or exc).strip().splitlines()
            raise SlurmError(f"sbatch refused the sweep's jobs: {said[-1] if said else type(exc).__name__}")

    try:
        while True:
            running = ledger.running()
            states = queue_states([e["jobs"][-1] for e in running.values()])
            if states is None:  # the controller did not answer this time: look again later
                time.sleep(opts.poll)
                continue
            for key, entry in running.items():
                job = entry["jobs"][-1]
                row_file = cell_file(rows_dir, key)
                if row_file.exists():  # (looked at after the queue: a job that left the queue wrote it before)
                    if key not in done:
                        record(json.loads(row_file.read_text()))
                        done.add(key)
                    entry["state"] = "done"
                elif states.get(job) not in LIVE_STATES:
                    error = row_file.with_suffix(".error.json")
                    if error.exists():
                        entry.update(state="failed", why=json.loads(error.read_text())["error"])
                        error.unlink()
                        log(f"cell {key} failed (job {job}): {entry['why']}")
                    elif entry["tries"] > opts.max_retries:
                        entry.update(state="failed", why=f"{entry['tries']} jobs ended without a result; last: "
                                                         f"{_why_failed(log_dir, job)}")
                        log(f"cell {key} failed: {entry['why']}")
                    else:
                        log(f"job {job} ({key}) ended {states.get(job, 'GONE')} without its result: submitting it "
                            f"again ({entry['tries']} of {opts.max_retries + 1} tries used; it resumes from its "
                            f"checkpoint); {_why_failed(log_dir, job)}")
                        entry["state"] = "retry"
            if running:
                ledger.save()
            in_flight = len(ledger.running())
            room = (opts.max_jobs - in_flight) if opts.max_jobs else None
            blocked = {k for k, e in ledger.cells.items() if e["state"] in ("running", "failed", "done")}
            todo = []
            for cell in ready(blocked | done):  # (a row left by a job of a run whose ledger was lost: collected)
                if cell_file(rows_dir, cell.key).exists():
                    record(json.loads(cell_file(rows_dir, cell.key).read_text()))
                    done.add(cell.key)
                else:
                    todo.append(cell)
            todo = todo[:room]
            if todo:
                safely(todo)
            elif not in_flight:
                break
            else:
                time.sleep(opts.poll)
    except KeyboardInterrupt:
        log(f"stopped; the submitted jobs keep running. Rerun the same command to collect them (it submits nothing "
            f"twice), or cancel them: scancel --name={name}")
        raise
    return [k for k, e in ledger.cells.items() if e["state"] == "failed"]
