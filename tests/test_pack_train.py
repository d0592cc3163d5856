"""Packed training in ccar train's engine and in ccar sweep: K cells trained as one program equal the same cells
trained one by one, in their weights, their metrics and their run folders; a packed sweep's results and report
equal an unpacked one's; a packed sweep stopped mid-epoch resumes to what it would have computed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ccar import ConfigError
from ccar.config import load_config
from ccar.engine import checkpoint as ckpt
from ccar.engine.pack_train import pack_blocker, pack_key, train_pack
from ccar.engine.preemption import Preempted
from ccar.engine.train import train
from ccar.sweep import read_results, run_sweep
from ccar.sweep.packing import pack_size
from conftest import make_idx_dataset

FAST = ["model.width=4", "optim.batch_size=32", "threads=1", "progress=false", "dataset=mnist-lt", "imbalance=10"]
# Two losses, three samplers, two seeds, two learning rates and weight decays in one pack
CELLS = [["loss.name=ce", "optim.lr=0.05", "seed=0"],
         ["loss.name=ccar", "loss.base=la", "sampler=class-balanced", "optim.lr=0.03", "seed=1"],
         ["loss.name=la", "sampler=sqrt", "seed=2", "optim.weight_decay=0"]]
# Packed and alone differ in the order of floating-point reductions (the vmapped convolutions' gradients): after
# three epochs every weight agrees to 1e-3 (measured: at most 5.5e-5 on a bias and 1.5e-6 elsewhere) and the
# per-epoch losses to 1e-5.
WEIGHT_TOL, LOSS_TOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=10)


def cfg(digits, out, cell, epochs=3):
    return load_config(None, [f"data_root={digits}", f"epochs={epochs}", f"out={out}", *FAST, *cell])


def quiet(*_):
    pass


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, exact: bool = False):
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            assert torch.allclose(wa[name].float(), wb[name].float(), atol=WEIGHT_TOL, rtol=0), name
    la, lb = _log(a), _log(b)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=LOSS_TOL) and ra["lr"] == rb["lr"]
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for key in ("top1", "balanced", "per_class", "val_balanced", "best_epoch"):
        assert ma[key] == mb[key], key


def test_packed_cells_equal_the_same_cells_trained_alone(digits, tmp_path):
    alone = [train(cfg(digits, tmp_path / f"alone{k}", c), log=quiet) for k, c in enumerate(CELLS)]
    packed = train_pack([cfg(digits, tmp_path / f"packed{k}", c) for k, c in enumerate(CELLS)], [False] * 3,
                        log=quiet)
    assert [m["top1"] for m in packed] == [m["top1"] for m in alone]
    for k in range(len(CELLS)):
        assert_same_run(tmp_path / f"alone{k}", tmp_path / f"packed{k}")
        # a packed cell's folder is an unpacked one's: the same files, the same checkpoint keys
        assert sorted(p.name for p in (tmp_path / f"alone{k}").iterdir()) == sorted(
            p.name for p in (tmp_path / f"packed{k}").iterdir())
        sa, sb = (ckpt.read_checkpoint(tmp_path / d / "checkpoint.safetensors")[0] for d in (f"alone{k}", f"packed{k}"))
        assert sa.keys() == sb.keys()


def test_a_stopped_pack_resumes_cell_by_cell_and_cells_that_cannot_step_together_train_one_by_one(
        digits, tmp_path, monkeypatch):
    """A pack stopped by SIGTERM at step 5 leaves each cell's checkpoint there (its weights, momentum, random
    states); each cell then resumes alone and ends as the cell trained alone from the start. Cells with different
    batch counts per epoch fall back to one by one, and say so."""
    monkeypatch.setenv(ckpt.FAULT_ENV, "signal:5:SIGTERM")
    with pytest.raises(Preempted, match="a pack of 2"):
        train_pack([cfg(digits, tmp_path / f"p{k}", c) for k, c in enumerate(CELLS[:2])], [False] * 2, log=quiet)
    monkeypatch.delenv(ckpt.FAULT_ENV)
    for k, c in enumerate(CELLS[:2]):
        assert ckpt.read_checkpoint(tmp_path / f"p{k}" / "checkpoint.safetensors")[1]["partial"]["step"] == 5
        train(cfg(digits, tmp_path / f"p{k}", c), resume=True, log=quiet)
        train(cfg(digits, tmp_path / f"a{k}", c), log=quiet)
        assert_same_run(tmp_path / f"a{k}", tmp_path / f"p{k}")
    lines = []
    mixed = [cfg(digits, tmp_path / "m0", CELLS[0]), cfg(digits, tmp_path / "m1", CELLS[0] + ["imbalance=2"])]
    metrics = train_pack(mixed, [False, False], log=lines.append)
    assert any("trained one by one (the cells have different numbers of batches per epoch" in line for line in lines)
    assert all((tmp_path / d / "metrics.json").is_file() for d in ("m0", "m1")) and len(metrics) == 2


def test_what_packs_and_what_does_not():
    base = load_config(None, FAST)
    assert pack_blocker(base) is None
    for override, why in (("optim.sam=0.05", "optim.sam"), ("optim.name=adamw", "optim.name=adamw"),
                          ("finetune=linear", "finetune=linear"), ("optim.accumulate=2", "accumulate")):
        assert why in pack_blocker(load_config(None, FAST + [override]))
    same = [load_config(None, FAST + c) for c in CELLS]  # losses, samplers, seeds, lrs: one pack
    assert len({pack_key(c) for c in same}) == 1
    assert pack_key(load_config(None, FAST + ["model.width=8"])) != pack_key(same[0])
    assert pack_size("auto", "local", cuda=False)[0] == 1 and pack_size("auto", "local", cuda=True)[0] == 16
    assert pack_size(3, "slurm", cuda=True)[0] == 1
    for bad in (0, "some", 2.5, True):
        with pytest.raises(ConfigError, match="pack must be auto, off or a number"):
            pack_size(bad, "local", cuda=False)


def sweep_file(tmp_path, digits, name, pack):
    spec = {"out": str(tmp_path / name), "pack": pack,
            "base": {"dataset": "mnist-lt", "data_root": str(digits), "imbalance": 10, "epochs": 2,
                     "model": {"width": 4}, "optim": {"batch_size": 32}, "threads": 1},
            "seeds": [0, 1],
            "methods": {"CE": {"loss.name": "ce"}, "CCAR-LA": {"loss.name": "ccar", "loss.base": "la"},
                        "CB": {"loss.name": "ce", "sampler": "class-balanced"},
                        "CE+cRT": {"loss.name": "ce", "stage2": {"method": "crt", "epochs": 1}}},
            "report": {"baselines": {"CCAR-LA": "CE"}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(folder):
    return {r["key"]: r for r in read_results(folder / "results.jsonl")}


def test_a_packed_sweep_equals_an_unpacked_one(digits, tmp_path):
    lines = []
    run_sweep(str(sweep_file(tmp_path, digits, "off", "off")), log=quiet)
    run_sweep(str(sweep_file(tmp_path, digits, "packed", 6)), log=lines.append)
    assert "pack: up to 6 cells as one program" in lines
    off, packed = _rows(tmp_path / "off"), _rows(tmp_path / "packed")
    assert off.keys() == packed.keys()
    sizes = [r["pack"]["size"] for r in packed.values() if "pack" in r]
    assert sizes == [6] * 6  # CE, CCAR-LA, CB x 2 seeds; CE+cRT re-trains CE's classifier (no training of its own)
    for key, row in off.items():
        other = packed[key]
        for metric in ("top1", "balanced", "val_balanced", "per_class", "best_epoch"):
            assert row["metrics"][metric] == other["metrics"][metric], (key, metric)
        assert [h["loss"] for h in row["history"]] == pytest.approx([h["loss"] for h in other["history"]],
                                                                    rel=LOSS_TOL)
    report_off = (tmp_path / "off" / "report.md").read_text()
    report_packed = (tmp_path / "packed" / "report.md").read_text()
    assert _tables(report_off) == _tables(report_packed)


def _tables(report: str):
    """The report's table rows (its numbers), without the lines about time and place."""
    return [line for line in report.splitlines() if line.startswith("|") and "min" not in line and "/" not in line]


def test_a_packed_sweep_stopped_mid_epoch_resumes_bit_identically(digits, tmp_path):
    """SIGTERM to a packed sweep (its first cell watches for the pack) at step 5 of epoch 1: every cell's checkpoint
    is at that step; the rerun of the same command resumes the pack and finishes as the uninterrupted packed sweep."""
    full = sweep_file(tmp_path, digits, "full", 3)
    cut = sweep_file(tmp_path, digits, "cut", 3)
    run_sweep(str(full), log=quiet)
    env = {**os.environ, "OMP_NUM_THREADS": "1", ckpt.FAULT_ENV: "signal:5:SIGTERM"}
    cmd = [sys.executable, "-m", "ccar", "sweep", str(cut)]
    stopped = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    runs = tmp_path / "cut" / "runs"
    partial = [ckpt.read_checkpoint(p)[1].get("partial") for p in sorted(runs.rglob("checkpoint.safetensors"))]
    assert len(partial) == 3 and all(p is not None and (p["epoch"], p["step"]) == (0, 5) for p in partial)
    env.pop(ckpt.FAULT_ENV)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    full_rows, cut_rows = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert full_rows.keys() == cut_rows.keys()
    for key in full_rows:
        if full_rows[key].get("trained_by"):
            continue
        assert_same_run(tmp_path / "full" / "runs" / key, runs / key, exact=True)


def test_cells_pack_under_bf16_autocast(digits, tmp_path):
    """vmap's batch norm refuses bf16 inputs beside float32 statistics (this is what autocast gives); the packed
    model's batch norm normalises in the statistics' dtype. bf16 packed and alone agree to bf16's precision."""
    cells = [c + ["amp=bf16"] for c in CELLS[:2]]
    alone = [train(cfg(digits, tmp_path / f"alone{k}", c, epochs=1), log=quiet) for k, c in enumerate(cells)]
    packed = train_pack([cfg(digits, tmp_path / f"packed{k}", c, epochs=1) for k, c in enumerate(cells)],
                        [False] * 2, log=quiet)
    for a, p in zip(alone, packed):
        assert p["precision"]["ran"] == "bf16" and abs(a["top1"] - p["top1"]) <= 20.0
    for k in range(2):
        la, lp = _log(tmp_path / f"alone{k}"), _log(tmp_path / f"packed{k}")
        assert la[0]["loss"] == pytest.approx(lp[0]["loss"], rel=5e-3)  # (measured: 3.5e-4, 1.4e-3)
