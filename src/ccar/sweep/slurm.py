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

Each job's request fits the partition it goes to (``scontrol show partition``, ``sinfo``): the CPUs and time left to
their defaults are sized to its largest node and its time limit, and a request that no node of it can hold (CPUs,
memory, GPUs) or that exceeds its time limit is refused before anything is submitted, where Slurm would accept it
and keep it PENDING for ever. While waiting, a job PENDING for a reason that never clears by itself (a partition,
QOS or account limit the job alone breaks; every node it fits drained or down) fails the sweep, naming the reason,
after its pending jobs are cancelled; other reasons are said once and waited for.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..engine.checkpoint import atomic_write
from ..errors import CCARError, ConfigError
from .cell import run_cell
from .results import read_results

# Job states in which a job may still run (or run again): the driver waits for it rather than submitting anew.
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
SIGNAL = "USR1@120"  # ccar's runs checkpoint on SIGUSR1 (and SIGTERM); two minutes before the time limit
DEFAULT_CPUS = 4  # what a job asks unless told; fewer where the partition's nodes are smaller
DEFAULT_TIME = 60  # minutes; less where the partition's time limit is lower

# PENDING reasons that never clear by themselves, each with what to change. Slurm (its default EnforcePartLimits=NO)
# accepts a job that breaks a limit of its partition, QOS or account and leaves it PENDING for ever: these limits hold
# for the job alone, whatever else runs (squeue(1) "JOB REASON CODES", resource_limits.html). Not here, and waited for:
# Resources and Priority (its turn comes); Dependency, BeginTime, JobArrayTaskLimit, Licenses, Reservation (time or
# other jobs end them); JobHeldUser/JobHeldAdmin (someone holds it on purpose and releases it); the aggregate limits
# (QOSGrp*/AssocGrp*, *PerUser, *PerAccount, *Jobs*, *Submit*: a share that frees as other jobs end, or a usage budget
# that decays); PartitionDown/PartitionInactive/NodeDown and maintenance reservations (an administrator's state that
# ends). Nodes drained or down are judged from the nodes themselves (:meth:`_Driver.stranded`).
NEVER_CLEARS = {
    "PartitionConfig": "the job asks more of one node than the partition gives (CPUs, memory, GPUs, MaxCPUsPerNode, "
                       "an account or QOS it does not allow): ask for less (--cpus-per-run, --mem, --gpus-per-run) "
                       "or choose another --partition",
    "PartitionTimeLimit": "the job's time limit is over the partition's: lower --time or choose another --partition",
    "PartitionNodeLimit": "the partition's node limits (MinNodes, MaxNodes) or its drained nodes exclude a one-node "
                          "job: choose another --partition",
    "BadConstraints": "no node has the features asked: fix --sbatch constraint=...",
    "InvalidAccount": "no such account, or not yours: fix --sbatch account=... (sacctmgr show assoc user=$USER)",
    "AccountNotAllowed": "the partition does not allow this account: --sbatch account=..., or another --partition",
    "InvalidQOS": "no such QOS, or not yours: fix --sbatch qos=... (sacctmgr show assoc user=$USER)",
    "QOSNotAllowed": "the partition does not allow this QOS: --sbatch qos=..., or another --partition",
    "DependencyNeverSatisfied": "a job it depends on failed: fix or drop --sbatch dependency=...",
    "ReservationDeleted": "its reservation is gone: drop --sbatch reservation=...",
}
# A per-job limit of a QOS or an account (QOSMaxCpuPerJobLimit, AssocMaxMemPerNode, QOSMinGRES, ...): unlike their
# *PerUser/*PerAccount/Grp* siblings, no other job's end makes room for it.
PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)(Max\w*Per(Job|Node)\w*|Min\w+)$")
PER_JOB_FIX = "the job breaks a per-job limit of its QOS or account: ask for less, or another QOS/account " \
              "(--sbatch qos=... / account=...; sacctmgr show qos lists the limits)"
# The reason of a job whose nodes are unavailable (Slurm 22.05 words it the second way, later versions the first)
NODES_UNAVAILABLE = re.compile(r"^(ReqNodeNotAvail|Nodes required for job are DOWN, DRAINED)")
ROUTINE = {"None", "Resources", "Priority", "Dependency", "BeginTime", "JobArrayTaskLimit", "Cleaning",
           "WaitingForScheduling", "Prolog"}  # reasons every busy cluster shows: not worth a line


class SlurmError(CCARError):
    """Slurm cannot take the sweep (not installed, controller down, unknown partition, sbatch refused)."""


@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    time: Optional[int] = None  # minutes per job (None: DEFAULT_TIME, or the partition's limit if lower)
    cpus_per_run: Optional[int] = None  # None: DEFAULT_CPUS, or what the partition's largest node has if fewer
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
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.mem is not None:
            mem_mb(self.mem)
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


def mem_mb(text: str) -> int:
    """``--mem`` as sbatch reads it, in MB: a whole number, its unit K, M (the default), G or T.

    >>> mem_mb("32G"), mem_mb("500"), mem_mb("1t")
    (32768, 500, 1048576)
    """
    found = re.fullmatch(r"(\d+)([KMGT]?)", str(text).strip(), re.IGNORECASE)
    if not found:
        raise ConfigError(f"--mem {text!r}: give memory as sbatch takes it, a whole number with K, M, G or T "
                          f"(e.g. 32G)")
    kilobytes = {"K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}[found.group(2).upper() or "M"]
    return int(found.group(1)) * kilobytes // 1024


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


def _number(text: Optional[str]) -> Optional[int]:
    found = re.match(r"\d+", text or "")  # ("UNLIMITED", "(null)", "N/A": None)
    return int(found.group()) if found else None


def _minutes(text: Optional[str]) -> Optional[int]:
    """A Slurm duration ([D-]HH:MM:SS, MM:SS, MM, D-HH[:MM]) in whole minutes; None when unlimited."""
    if not text or not text[0].isdigit():
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts = [int(days) * 24 + parts[0], *parts[1:], 0, 0][:3]
    else:  # MM, MM:SS, HH:MM:SS
        parts = {1: [0, parts[0], 0], 2: [0, *parts]}.get(len(parts), parts)
    return parts[0] * 60 + parts[1]


def _gpus(gres: str) -> int:
    """The GPUs in a node's GRES (``gpu:a100:4(S:0-1),gpu:2``: 6; ``(null)``: 0)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


@dataclass
class Node:
    """A node as ``sinfo`` shows it."""
    name: str
    cpus: int
    mem: int  # MB
    gpus: int
    state: str = "idle"  # sinfo's long form: idle, mixed, drained, down*, ...
    why: str = ""  # the administrator's reason for a drained or down node

    def needs_admin(self) -> bool:
        """Whether the node can start no job until an administrator acts: drained, failed, invalid, or down while
        its slurmd answers. One that stopped answering (down*), reboots or is powered down may come back by itself."""
        base = re.match(r"[a-z_]*", self.state).group()
        return base in ("drained", "draining", "drain", "fail", "failing", "inval", "future") or (
            base == "down" and not set(self.state[len(base):]) & set("*@^#"))


@dataclass
class Partition:
    """What a partition gives one job: its nodes and its per-node and time limits (None: unlimited)."""
    name: str
    nodes: List[Node]
    max_time: Optional[int] = None  # minutes
    max_cpus_per_node: Optional[int] = None
    max_mem_per_node: Optional[int] = None  # MB

    def offers(self, node: Node) -> Tuple[int, int, int]:
        """(CPUs, memory MB, GPUs) that one job can have of ``node`` here."""
        return (min(node.cpus, self.max_cpus_per_node or node.cpus), min(node.mem, self.max_mem_per_node or node.mem),
                node.gpus)

    def holding(self, cpus: int, mem: int, gpus: int) -> List[Node]:
        """The nodes that can hold a job of ``cpus`` CPUs, ``mem`` MB (0: any) and ``gpus`` GPUs."""
        return [n for n in self.nodes if all(have >= ask for have, ask in zip(self.offers(n), (cpus, mem, gpus)))]


def read_partition(name: Optional[str]) -> Partition:
    """The partition ``name`` (None: the cluster's default), from ``scontrol show partition`` and ``sinfo``."""
    shown = _run(["scontrol", "show", "partition", "-o"])
    rows = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in shown.stdout.splitlines()]
    row = next((r for r in rows if (r.get("PartitionName") == name if name else r.get("Default") == "YES")), None)
    if row is None:
        said = (shown.stderr.strip().splitlines() or ["no such partition"])[-1]
        raise SlurmError(f"cannot read Slurm partition {name or '(default)'} (scontrol show partition: {said}): "
                         f"pass --partition (sinfo lists them)")
    listed = _run(["sinfo", "-h", "-N", "-p", row["PartitionName"], "-o", "%N|%c|%m|%G|%T|%E"])
    if listed.returncode != 0:
        said = (listed.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlurmError(f"cannot list the nodes of Slurm partition {row['PartitionName']} (sinfo: {said})")
    nodes = {}  # (sinfo -N lists a node once per partition it is in; -p keeps one, the dict drops repeats)
    for line in listed.stdout.splitlines():
        node, cpus, mem, gres, state, why = (line.split("|", 5) + [""] * 5)[:6]
        nodes[node] = Node(node, _number(cpus) or 0, _number(mem) or 0, _gpus(gres), state.lower(), why.strip())
    return Partition(row["PartitionName"], list(nodes.values()), _minutes(row.get("MaxTime")),
                     _number(row.get("MaxCPUsPerNode")), _number(row.get("MaxMemPerNode")))


def fit_request(opts: SlurmOptions, gpus: int, part: Partition) -> SlurmOptions:
    """``opts`` with the CPUs and time left to their defaults sized to ``part``: DEFAULT_CPUS (at least one per GPU)
    or, if fewer, what its largest node that holds the rest of the request has; DEFAULT_TIME or its time limit.
    A request that no node of ``part`` can hold, or longer than its limit, is refused: Slurm would queue it for ever."""
    mem = mem_mb(opts.mem) if opts.mem else 0  # (--mem 0 asks a whole node's memory, whatever it is)
    if not part.nodes:
        raise SlurmError(f"Slurm partition {part.name!r} has no nodes: choose another --partition (sinfo lists them)")
    fits = part.holding(opts.cpus_per_run or 1, mem, gpus)
    if not fits:
        most = [max(part.offers(n)[i] for n in part.nodes) for i in range(3)]
        asks = [("--cpus-per-run", opts.cpus_per_run or 1, most[0], "CPUs"), ("--mem", mem, most[1], "MB"),
                ("--gpus-per-run" if opts.gpus_per_run is not None else "the sweep file's gpus_per_run", gpus,
                 most[2], "GPUs")]
        over = [a for a in asks if a[1] > a[2]]
        said = "; ".join(f"{flag} asks {ask} {unit}, its largest node has {have}" for flag, ask, have, unit in
                         over or [a for a in asks if a[1]]) + ("" if over else "; no node has all of it at once")
        raise SlurmError(f"no node of Slurm partition {part.name!r} can run a job as asked ({said}): ask for less "
                         f"or choose another --partition")
    cpus = opts.cpus_per_run or min(max(DEFAULT_CPUS, gpus), max(part.offers(n)[0] for n in fits))
    minutes = opts.time or min(DEFAULT_TIME, part.max_time or DEFAULT_TIME)
    if part.max_time is not None and minutes > part.max_time:
        raise SlurmError(f"--time {minutes} is over Slurm partition {part.name!r}'s time limit ({part.max_time} min): "
                         f"give --time {part.max_time} or less, or choose another --partition")
    return replace(opts, cpus_per_run=cpus, time=minutes, partition=part.name)


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


def queue_states(job_ids: List[str]) -> Optional[Dict[str, Tuple[str, str]]]:
    """(state, pending reason) of each job that may still run, from ``squeue`` (and ``scontrol show job`` for those
    squeue no longer lists: a requeued job can be missing from squeue for a moment). None when Slurm did not answer."""
    if not job_ids:
        return {}
    listed = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-u", _user()])
    if listed.returncode != 0:
        return None
    rows = (line.split("|", 2) for line in listed.stdout.splitlines() if line.count("|") >= 2)
    states = {job: (state, reason) for job, state, reason in rows}  # (a reason may hold spaces: one job a line)
    out = {}
    for job in job_ids:
        if job not in states:
            shown = _run(["scontrol", "show", "job", job])
            fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f) if shown.returncode == 0 else {}
            states[job] = (fields.get("JobState", "GONE"), fields.get("Reason", ""))
        out[job] = states[job]
    return out


def never_clears(reason: str) -> Optional[str]:
    """What to change when a job is PENDING for ``reason`` that never clears by itself; None when it may clear (or
    when only the nodes can tell: :data:`NODES_UNAVAILABLE`).

    >>> never_clears("Resources") is None, never_clears("PartitionTimeLimit").startswith("the job's time limit")
    (True, True)
    """
    return NEVER_CLEARS.get(reason) or (PER_JOB_FIX if PER_JOB_LIMIT.match(reason) else None)


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


class _Driver:
    """One :func:`run_on_slurm`: its executor, ledger and rows; submits cells and looks at their jobs."""

    def __init__(self, opts: SlurmOptions, gpus: int, folder: Path, runs_root: Path, done: set,
                 record: Callable[[Dict[str, Any]], None], log):
        self.opts, self.gpus, self.nproc, self.runs_root = opts, gpus, max(1, gpus), runs_root
        self.done, self.record, self.log = done, record, log
        slurm_dir = folder / "slurm"
        self.rows_dir, self.log_dir = slurm_dir / "rows", slurm_dir / "logs"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"ccar-{folder.name}"
        self.executor = make_executor(self.log_dir, opts, self.name, gpus)
        self.ledger = Ledger(slurm_dir / "jobs.json")
        for entry in self.ledger.cells.values():  # a rerun gives the cells that failed before a fresh budget
            if entry["state"] == "failed":
                entry.update(state="retry", tries=0)
        self.said: set = set()  # the pending reasons already told

    def submit(self, cells: list) -> None:
        """Submit ``cells`` as one job array and note their jobs in the ledger."""
        threads = max(1, self.opts.cpus_per_run // self.nproc)
        try:
            jobs = []
            with self.executor.batch():
                for cell in cells:
                    jobs.append(self.executor.submit(
                        cell_job, cell, str(self.runs_root / cell.key), threads,
                        cell.shares and str(self.runs_root / cell.shares), str(self.runs_root / "features"),
                        str(cell_file(self.rows_dir, cell.key)), self.nproc))
        except CCARError:
            raise
        except Exception as exc:  # sbatch refused (a bad option, no such account, GPUs on a CPU partition, ...)
            said = str(getattr(exc, "stderr", None) or exc).strip().splitlines()
            raise SlurmError(f"sbatch refused the sweep's jobs: {said[-1] if said else type(exc).__name__}")
        for cell, job in zip(cells, jobs):
            entry = self.ledger.cells.setdefault(cell.key, {"jobs": [], "tries": 0})
            entry["jobs"].append(job.job_id)
            entry.update(state="running", tries=entry.get("tries", 0) + 1)
        self.ledger.save()
        first = jobs[0].job_id.split("_")[0]
        self.log(f"submitted {len(cells)} cell{'s' * (len(cells) > 1)} as Slurm job {first}"
                 + (f" ({cells[0].key}{' ...' if len(cells) > 1 else ''})" if cells else ""))

    def look(self) -> Optional[int]:
        """One look at the queue: collect the rows of jobs that finished, resubmit or fail the cells whose job ended
        without, stop at a job that can never start. Returns the cells in flight (None: Slurm did not answer)."""
        running = self.ledger.running()
        states = queue_states([e["jobs"][-1] for e in running.values()])
        if states is None:
            return None
        for key, entry in running.items():
            job = entry["jobs"][-1]
            row_file = cell_file(self.rows_dir, key)
            if row_file.exists():  # (looked at after the queue: a job that left the queue wrote it before)
                if key not in self.done:
                    self.record(json.loads(row_file.read_text()))
                    self.done.add(key)
                entry["state"] = "done"
            elif states[job][0] not in LIVE_STATES:
                self._ended(key, entry, job, states[job][0])
        if running:
            self.ledger.save()
        self._judge_pending({k: e["jobs"][-1] for k, e in self.ledger.running().items()
                             if states[e["jobs"][-1]][0] == "PENDING"}, states)
        return len(self.ledger.running())

    def _ended(self, key: str, entry: Dict[str, Any], job: str, state: str) -> None:
        error = cell_file(self.rows_dir, key).with_suffix(".error.json")
        if error.exists():
            entry.update(state="failed", why=json.loads(error.read_text())["error"])
            error.unlink()
            self.log(f"cell {key} failed (job {job}): {entry['why']}")
        elif entry["tries"] > self.opts.max_retries:
            entry.update(state="failed", why=f"{entry['tries']} jobs ended without a result; last: "
                                             f"{_why_failed(self.log_dir, job)}")
            self.log(f"cell {key} failed: {entry['why']}")
        else:
            self.log(f"job {job} ({key}) ended {state} without its result: submitting it again ({entry['tries']} of "
                     f"{self.opts.max_retries + 1} tries used; it resumes from its checkpoint); "
                     f"{_why_failed(self.log_dir, job)}")
            entry["state"] = "retry"

    def _judge_pending(self, pending: Dict[str, str], states: Dict[str, Tuple[str, str]]) -> None:
        """Give up on the sweep at a pending job whose reason never clears; tell the other unusual reasons once."""
        stranded: Optional[str] = None
        for key, job in pending.items():
            reason = states[job][1]
            fix = never_clears(reason)
            if fix is None and NODES_UNAVAILABLE.match(reason):
                stranded = stranded if stranded is not None else self.stranded()
                fix = stranded or None
            if fix:
                self._give_up(key, job, reason, fix, pending)  # (raises)
            if reason.split(",")[0] not in ROUTINE | self.said:
                self.said.add(reason.split(",")[0])
                self.log(f"job {job} ({key}) is PENDING: {reason}; it starts when that clears")

    def stranded(self) -> str:
        """What to do when every node of the partition that can hold a job is drained or down for good (until an
        administrator acts): a job waiting for one waits for ever. '' when one of them may take it."""
        part = read_partition(self.opts.partition)
        fits = part.holding(self.opts.cpus_per_run, mem_mb(self.opts.mem) if self.opts.mem else 0, self.gpus)
        if not fits or not all(n.needs_admin() for n in fits):
            return ""
        nodes = ", ".join(f"{n.name} {n.state}" + (f" ({n.why})" if n.why else "") for n in fits[:3])
        return (f"every node of partition {part.name} that can hold the job is drained or down ({nodes}"
                f"{' ...' if len(fits) > 3 else ''}): ask the cluster's administrators, or choose another --partition")

    def _give_up(self, key: str, job: str, reason: str, fix: str, pending: Dict[str, str]) -> None:
        """Cancel the sweep's pending jobs (they ask alike: none of them would start) and fail with ``reason``."""
        cancel = _run(["scancel", "--state=PENDING", *pending.values()])
        for cell in pending:
            self.ledger.cells[cell].update(state="failed", why=f"PENDING for ever ({reason}): {fix}")
        self.ledger.save()
        jobs, left = f"{len(pending)} pending job{'s' * (len(pending) > 1)}", len(self.ledger.running())
        raise SlurmError(f"Slurm will never start job {job} ({key}): it is PENDING with reason {reason!r}, which does "
                         f"not clear by itself; {fix}. "
                         + (f"Cancelled the sweep's {jobs}" if cancel.returncode == 0 else f"Could not cancel the "
                            f"sweep's {jobs} (cancel them: scancel --name={self.name} --state=PENDING)")
                         + (f" ({left} running keep running)" if left else "")
                         + "; then rerun the same command: it runs only what is missing")

    def todo(self, ready: Callable[[set], list], in_flight: int) -> list:
        """The ready cells to submit now (within --jobs); a row left by a job of a run whose ledger was lost is
        collected instead."""
        room = (self.opts.max_jobs - in_flight) if self.opts.max_jobs else None
        blocked = {k for k, e in self.ledger.cells.items() if e["state"] in ("running", "failed", "done")}
        todo = []
        for cell in ready(blocked | self.done):
            row_file = cell_file(self.rows_dir, cell.key)
            if row_file.exists():
                self.record(json.loads(row_file.read_text()))
                self.done.add(cell.key)
            else:
                todo.append(cell)
        return todo[:room]


def run_on_slurm(spec: Dict[str, Any], folder: Path, runs_root: Path, results_path: Path, opts: SlurmOptions,
                 ready: Callable[[set], list], record: Callable[[Dict[str, Any]], None], log=print) -> List[str]:
    """Submit the sweep's ready cells and collect their rows until none is left; returns the failed cells' keys
    (with why, in ``slurm/jobs.json``). ``ready(started)``: the cells not yet run and not in ``started``. The
    caller has checked the cluster (:func:`check_cluster`); the request is fitted to the partition here."""
    gpus = opts.gpus_per_run if opts.gpus_per_run is not None else int(spec.get("gpus_per_run") or 0)
    asked = opts
    opts = fit_request(opts, gpus, read_partition(opts.partition))
    driver = _Driver(opts, gpus, folder, runs_root, {r["key"] for r in read_results(results_path)}, record, log)
    fitted = " (fitted to its nodes)" if asked.cpus_per_run is None and opts.cpus_per_run < DEFAULT_CPUS else ""
    where = (f"partition {opts.partition}, {opts.cpus_per_run} CPUs{fitted}" + (f", {gpus} GPUs" if gpus else "")
             + (f", {opts.mem} memory" if opts.mem else ""))
    log(f"launcher slurm: each cell one job ({where}, {opts.time} min; torchrun x{driver.nproc} inside) named "
        f"{driver.name}; logs in {driver.log_dir}")
    try:
        while True:
            in_flight = driver.look()
            if in_flight is None:  # the controller did not answer this time: look again later
                time.sleep(opts.poll)
                continue
            todo = driver.todo(ready, in_flight)
            if todo:
                driver.submit(todo)
            elif not in_flight:
                break
            else:
                time.sleep(opts.poll)
    except KeyboardInterrupt:
        log(f"stopped; the submitted jobs keep running. Rerun the same command to collect them (it submits nothing "
            f"twice), or cancel them: scancel --name={driver.name}")
        raise
    return [k for k, e in driver.ledger.cells.items() if e["state"] == "failed"]
