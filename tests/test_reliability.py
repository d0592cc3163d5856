"""Faults and hostile input: SIGKILL and resume, non-finite losses, full disks, crafted checkpoints, bombs, fuzzing."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ccar import DataError, TrainingError
from ccar.cli import main
from ccar.engine import checkpoint as ckpt
from ccar.engine.config import TrainConfig, load_config
from ccar.engine.build import make_loaders
from ccar.engine.train import train
from conftest import FUZZ_COUNTS, make_idx_dataset

FAST = ["model.width=4", "optim.batch_size=16", "optim.lr=0.05", "threads=1", "progress=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=6)


def _args(digits, out, epochs=6):
    return ["dataset=mnist-lt", f"data_root={digits}", "imbalance=10", f"epochs={epochs}", f"out={out}", *FAST]


def _train_proc(args, env=None, resume=False):
    cmd = [sys.executable, "-m", "ccar", "train", *args] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# --- kill and resume --------------------------------------------------------------------------------------------------


def _epochs_logged(out) -> int:
    log = out / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _kill_after(proc, out, epochs: int) -> None:
    """SIGKILL ``proc`` as soon as its run has logged ``epochs`` epochs: somewhere early in the next one. The run's
    progress decides when, not this machine's speed (a wall-clock kill point missed every run under load)."""
    while proc.poll() is None:
        if _epochs_logged(out) >= epochs:
            proc.send_signal(signal.SIGKILL)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(digits, tmp_path):
    reference = tmp_path / "reference"
    assert _train_proc(_args(digits, reference, epochs=15)).wait(timeout=300) == 0
    want = load_file(reference / "last.safetensors")
    rng = random.Random(1234)
    kills_per_trial = []
    for trial in range(6):
        out = tmp_path / f"killed{trial}"
        kills = 0
        while not (out / "last.safetensors").exists():
            resume = (out / "checkpoint.safetensors").exists()
            # Trial 0 dies inside a checkpoint write (after the temp file, before the rename); the rest after a random
            # number of epochs, at whatever point of the next epoch the signal lands.
            inject = trial == 0 and kills == 0
            done = _epochs_logged(out) if resume else 0
            proc = _train_proc(_args(digits, out, epochs=15), env={ckpt.FAULT_ENV: "checkpoint-write"} if inject else None,
                               resume=resume)
            if not inject and kills < 2 and done < 13:
                _kill_after(proc, out, rng.randint(done + 1, 13))
            code = proc.wait(timeout=300)
            if code == -signal.SIGKILL:
                kills += 1
            else:
                assert code == 0, proc.stderr.read().decode()[-2000:]
            if (out / "checkpoint.safetensors").exists():  # the latest checkpoint is never a corrupt one
                ckpt.read_checkpoint(out / "checkpoint.safetensors")
        got = load_file(out / "last.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), f"trial {trial} differs"
        kills_per_trial.append(kills)
    print(f"kill-and-resume: {len(kills_per_trial)} trials, SIGKILLs per trial {kills_per_trial}, all bit-identical")
    assert all(k >= 1 for k in kills_per_trial)


def test_nonfinite_loss_keeps_the_last_good_checkpoint(digits, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _args(digits, out, epochs=1)), log=lambda *_: None)
    before = (out / "checkpoint.safetensors").read_bytes()
    cfg = load_config(None, _args(digits, out, epochs=3) + ["optim.lr=1e30", "optim.schedule=constant"])
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 2, step \d+.*last good checkpoint is kept"):
        train(cfg, resume=True, log=lambda *_: None)
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert ckpt.read_checkpoint(out / "checkpoint.safetensors")[1]["epoch"] == 0


def test_nan_in_the_input_is_named_as_bad_data(tmp_path):
    (tmp_path / "train.csv").write_text("a,b,label\n1,2,x\n3,4,y\n1,2,x\n3,4,y\n")
    (tmp_path / "test.csv").write_text("a,b,label\nnan,2,x\n")
    with pytest.raises(DataError, match="test.csv column 'a' has a missing value at line 2"):
        train(load_config(None, ["dataset=csv", f"data_root={tmp_path}", "model.name=mlp", f"out={tmp_path / 'r'}"]))
    (tmp_path / "test.csv").write_text("a,b,label\ninf,2,x\n")
    with pytest.raises(DataError, match="test.csv column 'a' holds NaN or infinite values"):
        train(load_config(None, ["dataset=csv", f"data_root={tmp_path}", "model.name=mlp", f"out={tmp_path / 'r'}"]))


def test_full_disk_fails_before_training(digits, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    started = time.perf_counter()
    with pytest.raises(TrainingError, match=r"only 1 MiB free .* checkpoints need about"):
        train(load_config(None, _args(digits, tmp_path / "r")), log=lambda *_: None)
    assert not (tmp_path / "r" / "log.jsonl").exists()
    assert time.perf_counter() - started < 30


def test_too_large_for_the_device_fails_up_front_with_the_switch(digits, monkeypatch):
    from ccar.data import build_dataset
    from ccar.engine.distributed import DistContext

    data = build_dataset("mnist-lt", str(digits), 10)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10_000))
    cfg = TrainConfig()
    with pytest.raises(TrainingError, match=r"needs 0.00 GiB but only 0.00 GiB are free; set resident=false"):
        make_loaders(data, cfg, torch.device("cuda"), DistContext())
    cfg.resident = False  # the switch: host memory, batches copied to the device as they are used
    train_loader, _ = make_loaders(data, cfg, torch.device("cuda"), DistContext())
    assert train_loader.images.device.type == "cpu"


# --- hostile files ------------------------------------------------------------------------------------------------------


def test_crafted_checkpoint_is_refused_and_never_run(digits, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    train(load_config(None, _args(digits, run, epochs=1)), log=lambda *_: None)
    evil = pickle.dumps({"model": _Exploit(marker)})
    for name in ("checkpoint.safetensors", "best.safetensors"):
        (run / name).write_bytes(evil)
    with pytest.raises(TrainingError, match="cannot read checkpoint"):
        train(load_config(None, _args(digits, run, epochs=2)), resume=True, log=lambda *_: None)
    assert main(["eval", str(run)]) == 2
    assert not marker.exists()


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    from PIL import Image

    from ccar.data import ImageFileDataset, ImageFiles

    assert Image.MAX_IMAGE_PIXELS is not None  # importing ccar does not switch Pillow's guard off
    Image.fromarray(torch.zeros(40, 40, 3, dtype=torch.uint8).numpy()).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels > 2 x 100: a "bomb" at this limit
    ds = ImageFileDataset(ImageFiles([tmp_path / "big.png"], torch.zeros(1, dtype=torch.long).numpy()), train=False, size=8)
    with pytest.raises(DataError, match=r"cannot decode image .*big\.png.*decompression bomb"):
        ds[0]
    from ccar.data.folders import survey_images  # image_size=auto reads headers first: refused there too

    with pytest.raises(DataError, match=r"cannot decode image .*big\.png.*decompression bomb"):
        survey_images([tmp_path / "big.png"])


# --- fuzzing the configuration parsers and the CLI ---------------------------------------------------------------------

_KEYS = ["epochs", "seed", "optim.lr", "optim.milestones", "loss.name", "loss.omega", "model", "model.hidden", "nope",
         "loss.detach_weight", "imbalance", "optim.batch_size", "val_fraction", "workers", "optim.warmup_epochs"]
# Text, and numbers in and out of every key's valid range (negative epochs, zero batch size, val_fraction 1, ...).
_VALUES = st.one_of(st.text(max_size=10), st.integers(-(10**6), 10**6).map(str), st.floats().map(str),
                    st.sampled_from(["-3", "0", "1", "0.999", "1e30", "-1e-9", "[]", "[-1, 500]"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS), _VALUES), max_size=3))
def test_fuzz_cli_prints_one_line(tmp_path, capsys, items):
    FUZZ_COUNTS["CLI (ccar train)"] = FUZZ_COUNTS.get("CLI (ccar train)", 0) + 1
    # A missing data_root makes every accepted config fail fast at data loading instead of training.
    code = main(["train", "dataset=mnist-lt", f"data_root={tmp_path / 'missing'}", f"out={tmp_path / 'o'}", *items])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("ccar train: error:")


# --- preemption and restarts ------------------------------------------------------------------------------------------


def _steps_per_epoch(out, batch=16):
    return -(-sum(json.loads((out / "data.json").read_text())["class_counts"]) // batch)


def _finished(out):
    return load_file(out / "last.safetensors"), json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("sig, step", [("SIGTERM", 7), ("SIGUSR1", 23)])
def test_a_signal_mid_epoch_checkpoints_the_position_and_resuming_is_bit_identical(digits, tmp_path, sig, step):
    reference = tmp_path / "reference"
    assert _train_proc(_args(digits, reference, epochs=3)).wait(timeout=300) == 0
    out = tmp_path / "stopped"
    proc = _train_proc(_args(digits, out, epochs=3), env={ckpt.FAULT_ENV: f"signal:{step}:{sig}"})
    code = proc.wait(timeout=300)
    err = proc.stderr.read().decode()
    assert code == 128 + getattr(signal, sig), err[-2000:]
    assert f"stopped by {sig} at epoch" in err and err.strip().count("\n") == 0
    meta = ckpt.read_checkpoint(out / "checkpoint.safetensors")[1]
    per_epoch = _steps_per_epoch(out)
    assert (meta["partial"]["epoch"], meta["partial"]["step"]) == divmod(step, per_epoch) and step % per_epoch
    assert not (out / "last.safetensors").exists()
    # resume=auto continues it (the default when torchrun or Slurm restarts a job: the restart counter is set)
    env = {"TORCHELASTIC_RESTART_COUNT": "1"} if sig == "SIGTERM" else None
    extra = [] if env else ["resume=auto"]
    assert _train_proc(_args(digits, out, epochs=3) + extra, env=env).wait(timeout=300) == 0
    (w1, m1), (w2, m2) = _finished(reference), _finished(out)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1["per_class"] == m2["per_class"] and m1["val_balanced"] == m2["val_balanced"]


def test_resume_auto_starts_fresh_and_refuses_a_changed_config(digits, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _args(digits, out, epochs=1) + ["resume=auto"]), log=lambda *_: None)  # nothing there
    train(load_config(None, _args(digits, out, epochs=1) + ["resume=auto"]), log=lambda *_: None)  # finished: kept
    with pytest.raises(TrainingError, match=r"started with another config: loss.name \('ccar' -> 'ce'\)"):
        train(load_config(None, _args(digits, out, epochs=1) + ["resume=auto", "loss.name=ce"]), log=lambda *_: None)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(load_config(None, _args(digits, out, epochs=1)), log=lambda *_: None)  # resume unset, not a restart


def test_checkpoint_minutes_writes_mid_epoch_checkpoints_that_resume_bit_identically(digits, tmp_path):
    full = tmp_path / "full"
    train(load_config(None, _args(digits, full, epochs=2)), log=lambda *_: None)
    timed = tmp_path / "timed"  # a checkpoint after every step (1e-9 minutes), then a crash at step 20
    proc = _train_proc(_args(digits, timed, epochs=2) + ["checkpoint_minutes=1e-9"],
                       env={ckpt.FAULT_ENV: "signal:20:SIGKILL"})
    assert proc.wait(timeout=300) == -signal.SIGKILL
    partial = ckpt.read_checkpoint(timed / "checkpoint.safetensors")[1]["partial"]  # the one after step 19
    assert (partial["epoch"], partial["step"]) == divmod(19, _steps_per_epoch(timed))
    train(load_config(None, _args(digits, timed, epochs=2)), resume=True, log=lambda *_: None)
    (w1, m1), (w2, m2) = _finished(full), _finished(timed)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and m1["per_class"] == m2["per_class"]
