"""A real one-node Slurm cluster (scripts/local-slurm.sh): a training job preempted by a requeue resumes by itself."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ccar.sweep import read_results
from conftest import make_idx_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("slurmctld") and shutil.which("munged")) or os.geteuid() != 0,
                                 reason="Slurm not installed, or not root (scripts/local-slurm.sh install)")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CCAR_SLURM_DIR": str(state)}
    subprocess.run(["bash", str(ROOT / "scripts" / "local-slurm.sh"), "start"], check=True, env=env, timeout=120)
    yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", str(ROOT / "scripts" / "local-slurm.sh"), "stop"], env=env, timeout=60)


def _job_state(job, env):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def test_a_requeued_job_stops_at_a_step_and_resumes_by_itself_bit_identically(slurm, tmp_path):
    digits = make_idx_dataset(tmp_path / "digits", n_per_class=(60,) * 10, test_per_class=6)
    args = ["dataset=mnist-lt", f"data_root={digits}", "imbalance=10", "epochs=60", "model.width=4",
            "optim.batch_size=16", "optim.lr=0.05", "threads=1", "progress=false"]
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "ccar", "train", *args, f"out={tmp_path / 'reference'}"], check=True,
                   env=env, capture_output=True, timeout=300)
    script = tmp_path / "job.sh"  # no --resume: the requeued job continues because SLURM_RESTART_COUNT is set
    script.write_text(f"#!/bin/bash\nexec {sys.executable} -m ccar train {' '.join(args)} out={tmp_path / 'run'}\n")
    job = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", "-o", str(tmp_path / "job.log"),
                          str(script)], check=True, capture_output=True, text=True, env=env).stdout.strip()
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "checkpoint.safetensors").exists():
        time.sleep(0.2)
    time.sleep(1.0)  # mid-way through a later epoch
    subprocess.run(["scontrol", "requeue", job], check=True, env=env)  # Slurm's preemption: SIGTERM, then requeue
    deadline = time.time() + 400
    state, released = None, False
    while time.time() < deadline:
        state, restarts = _job_state(job, env)
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        if state == "PENDING" and not released:  # Slurm holds a requeued job ~2 minutes (BeginTime): skip the wait
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=env)
            released = True
        time.sleep(1)
    log = (tmp_path / "job.log").read_text()
    assert state == "COMPLETED" and restarts == 1, log[-3000:]
    assert "stopped by SIGTERM at epoch" in log  # the first run saved its place before it left
    a, b = load_file(tmp_path / "reference" / "last.safetensors"), load_file(tmp_path / "run" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sweep_file(tmp_path, digits, epochs):
    spec = {"out": str(tmp_path / "slurm-sweep"),
            "base": {"dataset": "mnist-lt", "data_root": str(digits), "imbalance": 5, "epochs": epochs,
                     "model": {"width": 4}, "optim": {"batch_size": 16}, "threads": 1},
            "seeds": [0, 1],
            "methods": {"CE": {"loss.name": "ce"}, "LA": {"loss.name": "la", "tune": {"loss.tau": [0.5, 1.0]}}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec))
    return path


def _job_process(job):
    """The Python process of a submitit job (``ARRAY_TASK`` ids as submitit names them, e.g. 12_1)."""
    array, _, task = job.partition("_")
    for proc in Path("/proc").iterdir():
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
            argv = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue
        ids = (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")) if task else (env.get("SLURM_JOB_ID"),)
        if ids == ((array, task) if task else (array,)) and "python" in Path(argv[0]).name \
                and "submitit.core._submit" in argv:
            return int(proc.name)
    return None


def _wait_for(what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_sweep_on_slurm_survives_a_cancelled_job_and_a_killed_worker_and_equals_the_local_launcher(slurm, tmp_path):
    digits = make_idx_dataset(tmp_path / "digits", n_per_class=(160,) * 10, test_per_class=6)
    path = _sweep_file(tmp_path, digits, epochs=12)
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    local = subprocess.run([sys.executable, "-m", "ccar", "sweep", str(path), "--out", str(tmp_path / "local")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm-sweep"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "ccar", "sweep", str(path), "--launcher", "slurm",
                               "--cpus-per-run", "1", "--time", "10", "--poll", "0.5"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    ledger = out / "slurm" / "jobs.json"

    def job_of(key):
        return json.loads(ledger.read_text())[key]["jobs"][-1] if ledger.exists() else None

    try:  # the first two cells run side by side (2 CPUs): cancel one mid-run, kill the other's Python process
        for key in ("CE/seed=0", "CE/seed=1"):
            _wait_for(lambda: (out / "runs" / key / "checkpoint.safetensors").exists())
        time.sleep(0.3)  # into a later epoch
        cancelled, killed = job_of("CE/seed=0"), job_of("CE/seed=1")
        subprocess.run(["scancel", cancelled], check=True, env=env)
        os.kill(_wait_for(lambda: _job_process(killed)), 9)
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.kill()
        subprocess.run(["scancel", "--name=ccar-slurm-sweep"], env=env)
    said = (tmp_path / "driver.log").read_text()
    jobs = json.loads(ledger.read_text())
    assert f"job {cancelled} (CE/seed=0) ended CANCELLED without its result" in said, said[-3000:]
    assert f"job {killed} (CE/seed=1) ended" in said
    assert len(jobs["CE/seed=0"]["jobs"]) == len(jobs["CE/seed=1"]["jobs"]) == 2  # one more job each, and
    assert all(len(v["jobs"]) == 1 for k, v in jobs.items() if not k.startswith("CE/"))  # the others ran once
    first_try = (out / "slurm" / "logs" / f"{cancelled}_0_log.err").read_text()
    assert "stopped by SIGTERM at epoch" in first_try  # scancel: a mid-epoch checkpoint, then the next job resumed
    rows, ref = read_results(out / "results.jsonl"), {r["key"]: r for r in read_results(tmp_path / "local" / "results.jsonl")}
    assert sorted(r["key"] for r in rows) == sorted(ref) and len(rows) == 5  # every cell once; tuned seeds included
    for row in rows:  # ... and the same numbers as the local launcher's, to the bit (resumed cells included)
        drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
        assert drop(row["metrics"]) == drop(ref[row["key"]]["metrics"]), row["key"]
    for key in ("CE/seed=0", "CE/seed=1"):
        a = load_file(out / "runs" / key / "last.safetensors")
        b = load_file(tmp_path / "local" / "runs" / key / "last.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = subprocess.run([sys.executable, "-m", "ccar", "sweep", str(path), "--launcher", "slurm", "--poll", "0.5",
                            "--cpus-per-run", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "5 already done" in again.stdout + again.stderr  # a rerun submits nothing
    assert json.loads(ledger.read_text()) == jobs


def test_slurm_launcher_errors_name_the_problem_before_anything_is_submitted(slurm, tmp_path):
    digits = make_idx_dataset(tmp_path / "digits", n_per_class=(20,) * 10, test_per_class=2)
    path = _sweep_file(tmp_path, digits, epochs=1)

    def sweep(*args, env=slurm):
        done = subprocess.run([sys.executable, "-m", "ccar", "sweep", str(path), "--launcher", "slurm", *args],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        return done.stderr.strip().splitlines()[-1]

    assert "partition 'gpu-a100' does not exist; partitions: debug*" in sweep("--partition", "gpu-a100")
    dead = tmp_path / "dead.conf"  # a controller nothing listens for
    dead.write_text(Path(slurm["SLURM_CONF"]).read_text() + "SlurmctldPort=6999\n")
    assert "the Slurm controller does not answer (scontrol ping: Slurmctld(primary) at" in sweep(
        env={**slurm, "SLURM_CONF": str(dead)})
    assert "sbatch refused the sweep's jobs: sbatch: error: Invalid generic resource" in sweep("--gpus-per-run", "1")
    assert not (tmp_path / "slurm-sweep" / "slurm" / "jobs.json").exists()
    spec = json.loads(path.read_text())  # a cell that fails in its job for a reason a retry cannot fix: once
    spec.update(seeds=[0], methods={"CE": {"loss.name": "ce"}})
    spec["base"]["data_root"] = str(tmp_path / "not-on-the-nodes")
    path.write_text(json.dumps(spec))
    said = sweep("--cpus-per-run", "1", "--poll", "0.5")
    assert "1 cell failed on Slurm (CE/seed=0)" in said and "rerun the same command" in said.lower()
    jobs = json.loads((tmp_path / "slurm-sweep" / "slurm" / "jobs.json").read_text())
    assert jobs["CE/seed=0"]["state"] == "failed" and len(jobs["CE/seed=0"]["jobs"]) == 1
    assert "not-on-the-nodes" in jobs["CE/seed=0"]["why"]
