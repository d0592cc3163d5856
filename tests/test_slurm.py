"""A real one-node Slurm cluster (scripts/local-slurm.sh): a training job preempted by a requeue resumes by itself."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
    deadline = time.time() + 400  # Slurm holds a requeued job ~2 minutes before it is eligible again
    state = None
    while time.time() < deadline:
        state, restarts = _job_state(job, env)
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(2)
    log = (tmp_path / "job.log").read_text()
    assert state == "COMPLETED" and restarts == 1, log[-3000:]
    assert "stopped by SIGTERM at epoch" in log  # the first run saved its place before it left
    a, b = load_file(tmp_path / "reference" / "last.safetensors"), load_file(tmp_path / "run" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
