"""The local launcher: a sweep's cells in this process (``jobs: 1``) or a pool of ``jobs`` worker processes, each
with its own GPUs when there are any."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import threading
from typing import List, Optional


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


def run_locally(ready, record, cell_args, jobs: int, per_run: int, log=print, group=None) -> None:
    """Run every ready cell (``ready(started)``: the cells not yet run and not in ``started``, in sweep order) here
    (``jobs`` 1) or in a pool of ``jobs`` workers, passing each result to ``record`` as it arrives. ``group(todo)``:
    the cells to run together as one pack, the first of ``todo`` among them (default: the first alone). The cells
    run through :func:`ccar.sweep.cell.run_unit`, looked up at call time."""
    from . import cell as cells

    group = group or (lambda todo: todo[:1])
    started: set = set()

    def next_unit(todo) -> list:
        unit = group(todo)
        started.update(c.key for c in unit)
        if len(unit) > 1:
            log(f"pack of {len(unit)}: {', '.join(c.key for c in unit)}")
        return [cell_args(c) for c in unit]

    if jobs == 1:
        while True:
            todo = ready(started)
            if not todo:
                return
            for row in cells.run_unit(next_unit(todo)):
                record(row)
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()
    if gpus:
        log(f"GPUs {','.join(gpus)}: each of the {jobs} workers sees {per_run} of them (round-robin)")
    with cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                                initargs=(context.Value("i", 0), gpus, per_run)) as pool, _workers_stop_with_us():
        running: set = set()
        while True:
            while len(running) < jobs and ready(started):
                running.add(pool.submit(cells.run_unit, next_unit(ready(started))))
            if not running:
                return
            finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                for row in future.result():
                    record(row)
