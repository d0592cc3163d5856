"""Data-parallel training with torchrun on CPU (gloo, 2 processes) against one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import make_csv, make_idx_dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, tmp_path, fault=None, restarts=0):
    """`torchrun --max-restarts RESTARTS ... -m ccar train ARGS`; must succeed, unless a ``fault`` is injected
    (CCAR_FAULT_INJECT) without restarts to recover from it."""
    from ccar.engine.checkpoint import FAULT_ENV

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--max-restarts", str(restarts), "-m", "ccar", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({FAULT_ENV: fault} if fault else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert (fault and not restarts) or proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # 96 + 32 + 16 = 144 training rows: with val_fraction 0 every global batch of 16 splits evenly into 2 x 8.
    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[]",
              "epochs=3", "loss.name=ccar", "loss.base=la", "optim.lr=0.05", "threads=1", "progress=false"]
    torchrun(1, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"], tmp_path)
    two = torchrun(2, common + ["optim.batch_size=8", f"out={tmp_path / 'two'}"], tmp_path)
    assert "x2" in two.stdout and two.stdout.count("epoch   3/3") == 1  # only rank 0 prints and writes
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["class_counts"] == m2["class_counts"] == [96, 32, 16]  # global counts, not a shard's
    assert m1["per_class"] == m2["per_class"] and m1["top1"] == m2["top1"]
    h1 = [json.loads(l) for l in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    h2 = [json.loads(l) for l in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(h1, h2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


@pytest.mark.slow
def test_sam_and_accumulation_under_two_processes_match_one_at_the_same_global_batch(tmp_path):
    """ImbSAM (its three passes average their gradients over the ranks: the perturbation is the global one) and
    gradient accumulation (2 processes x 4 x 2 batches = 16) against one process with batches of 16."""
    from ccar.engine.config import load_config
    from ccar.engine.train import train

    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[]",
              "epochs=2", "loss.name=ccar", "loss.base=la", "optim.lr=0.05", "threads=1", "progress=false"]
    sam = ["optim.sam=0.1", "optim.sam_scope=tail"]
    for name, extra in (("sam1", sam), ("one", [])):  # one process: in this one
        train(load_config(None, common + extra + ["optim.batch_size=16", f"out={tmp_path / name}"]), log=lambda *_: None)
    torchrun(2, common + sam + ["optim.batch_size=8", f"out={tmp_path / 'sam2'}"], tmp_path)
    acc = torchrun(2, common + ["optim.batch_size=4", "optim.accumulate=2", f"out={tmp_path / 'acc'}"], tmp_path)
    assert "effective batch 2 x 4 per process x 2 processes = 16" in acc.stdout
    from safetensors.torch import load_file

    for a, b in (("sam1", "sam2"), ("one", "acc")):
        w1, w2 = load_file(tmp_path / a / "last.safetensors"), load_file(tmp_path / b / "last.safetensors")
        assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1), (a, b)
    w_sam, w_one = load_file(tmp_path / "sam1" / "last.safetensors"), load_file(tmp_path / "one" / "last.safetensors")
    assert not all(torch.allclose(w_sam[k], w_one[k], atol=1e-4) for k in w_sam)  # SAM changed the training


@pytest.mark.slow
def test_augmented_images_under_two_processes_match_one_at_the_same_global_batch(tmp_path):
    """Random crop, RandAugment and Cutout on resident images: each rank draws for the whole global batch and takes
    its rows, so 2 x 8 trains like 1 x 16 (BatchNorm over the global batch: sync_bn). Mixing is the exception: each
    process pairs the samples of its own batch (engine/mixing.py)."""
    from safetensors.torch import load_file

    from ccar.engine.config import load_config
    from ccar.engine.train import train

    root = make_idx_dataset(tmp_path / "digits", n_per_class=(24,) * 10, test_per_class=4)  # 240 rows: 15 x 16
    common = ["dataset=mnist-lt", "imbalance=1", f"data_root={root}", "val_fraction=0", "model.width=4", "epochs=2",
              "sync_bn=true", "augment.policy=randaugment", "augment.cutout=3", "loss.name=ccar", "loss.base=la", "optim.lr=0.05",
              "threads=1", "progress=false"]
    train(load_config(None, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"]), log=lambda *_: None)
    torchrun(2, common + ["optim.batch_size=8", f"out={tmp_path / 'two'}"], tmp_path)
    one, two = (load_file(tmp_path / n / "last.safetensors") for n in ("one", "two"))
    err = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
    assert err < 1e-4, err


@pytest.mark.slow
def test_checkpoint_resumes_under_a_different_world_size(tmp_path):
    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[]",
              "loss.name=la", "threads=1", "progress=false", f"out={tmp_path / 'run'}"]
    torchrun(2, common + ["epochs=2", "optim.batch_size=8", "optim.schedule=constant"], tmp_path)
    torchrun(1, common + ["epochs=3", "optim.batch_size=16", "optim.schedule=constant", "--resume"], tmp_path)
    history = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in history] == [1, 2, 3]


@pytest.mark.slow
def test_a_linear_probe_gathers_every_rank_s_features(tmp_path):
    """Under torchrun each rank runs the frozen backbone over its shard; the gathered features, in the split's
    order, train the same classifier as one process."""
    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[6]",
              "finetune=linear", "epochs=2", "loss.name=la", "threads=1", "progress=false"]
    torchrun(1, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"], tmp_path)
    two = torchrun(2, common + ["optim.batch_size=8", f"out={tmp_path / 'two'}"], tmp_path)
    assert "features: the frozen backbone ran once" in two.stdout
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["per_class"] == m2["per_class"]
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    # the classifier and its input statistics (model.feature_norm), fitted on the gathered features: the same
    assert w1.keys() == {"fc.weight", "fc.bias", "fc.input_norm.mean", "fc.input_norm.std"}
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


@pytest.mark.slow
@pytest.mark.parametrize("method", [["loss.name=ccar", "loss.base=ride"], ["loss.name=sade"],
                                    ["loss.name=paco", "loss.alpha=0", "loss.gamma=0", "model.queue=64"]])
def test_expert_families_and_paco_s_queue_under_two_processes_match_one_at_the_same_global_batch(tmp_path, method):
    """RIDE (CCAR over it) and SADE: per-sample losses over every expert, so 2 x 8 trains like 1 x 16 (BatchNorm over
    the global batch: sync_bn). PaCo's queue is global and in global batch order (its keys gathered from every
    rank); its in-batch contrast is each process's own batch, so the equality holds where that term is off
    (alpha = gamma = 0: the centre term alone) -- and then the queues of both runs are the same tensors."""
    from safetensors.torch import load_file

    from ccar.engine.config import load_config
    from ccar.engine.train import train

    root = make_idx_dataset(tmp_path / "digits", n_per_class=(24,) * 10, test_per_class=4)  # 240 rows: 15 x 16
    common = ["dataset=mnist-lt", "imbalance=1", f"data_root={root}", "val_fraction=0", "model.width=4",
              "epochs=2", "sync_bn=true", "optim.lr=0.01", "threads=1", "progress=false", "amp=off", *method]
    train(load_config(None, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"]), log=lambda *_: None)
    torchrun(2, common + ["optim.batch_size=8", f"out={tmp_path / 'two'}"], tmp_path)
    one, two = (load_file(tmp_path / n / "last.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys()
    # relative to each tensor's largest value: measured at most 9e-6 (RIDE, whose logits are scaled by 30) and 8e-7
    # (SADE); at lr 0.05 the rounding of the two reductions grows chaotically to 1e-2 in 30 steps, so lr is 0.01
    err = max(((one[k].double() - two[k].double()).abs().max() / one[k].double().abs().max().clamp_min(1e-3)).item()
              for k in one if one[k].is_floating_point())
    assert err < 1e-4, err
    if "model.queue=64" in method:
        assert torch.equal(one["queue_targets"], two["queue_targets"]) and int((one["queue_targets"] >= 0).sum()) > 0
    m1, m2 = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert m1["class_counts"] == m2["class_counts"]
    if "loss.name=sade" in method:  # the test-time aggregation ran once, on rank 0, over the whole test set
        assert m1["test_agnostic_sade"].keys() == m2["test_agnostic_sade"].keys()


def _same_run(a_dir, b_dir):
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "last.safetensors"), load_file(b_dir / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    assert ma["per_class"] == mb["per_class"]


CSV_RUN = ["val_fraction=0", "model.name=mlp", "model.hidden=[8]", "epochs=3", "loss.name=ccar", "loss.base=la",
           "optim.lr=0.05", "optim.batch_size=8", "threads=1", "progress=false"]


@pytest.mark.slow
def test_torchrun_restarts_a_group_whose_worker_died_and_it_resumes_by_itself(tmp_path):
    """`torchrun --max-restarts 1`: rank 1 is SIGKILLed in epoch 2, after the first epoch's checkpoint; torchrun
    restarts both workers in place, they resume by themselves (resume=auto when TORCHELASTIC_RESTART_COUNT > 0) and
    connect through this attempt's own store keys; the job exits 0 with the uninterrupted run's weights and
    metrics. (Without the per-attempt keys 6 of 9 such restarts hung or were refused; docs/reliability.md.)"""
    common = [f"data_root={make_csv(tmp_path / 'csv', counts=(96, 32, 16))}", "dataset=csv", *CSV_RUN]
    torchrun(2, common + [f"out={tmp_path / 'whole'}"], tmp_path)
    proc = torchrun(2, common + [f"out={tmp_path / 'restarted'}"], tmp_path, fault="signal:12:SIGKILL:1", restarts=1)
    assert "resuming from its checkpoint: the start of epoch 2" in proc.stdout + proc.stderr
    _same_run(tmp_path / "whole", tmp_path / "restarted")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_relaunch_resumes_mid_epoch(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after step 5 of 8, rank 0 writes the position; a relaunch with
    --resume (what a requeued job does) finishes the run bit-identically to an uninterrupted one. On images with
    the random recipes (RandAugment + Cutout, Remix) and LAS: each rank's augmentation and mixing draws are restored
    where they stopped."""
    from ccar.engine.checkpoint import read_checkpoint

    root = make_idx_dataset(tmp_path / "digits", n_per_class=(60,) * 10, test_per_class=4)
    common = ["dataset=mnist-lt", f"data_root={root}", "imbalance=10", "val_fraction=0", "model.width=4", "epochs=2",
              "loss.name=las", "augment.policy=randaugment", "augment.cutout=3", "mix=remix", "optim.lr=0.05",
              "optim.batch_size=16", "threads=1", "progress=false"]
    torchrun(2, common + [f"out={tmp_path / 'whole'}"], tmp_path)
    proc = torchrun(2, common + [f"out={tmp_path / 'stopped'}"], tmp_path, fault="signal:5:SIGTERM:1")
    stopped = proc.stderr.count("stopped by SIGTERM at epoch 1, step 5/8")
    assert proc.returncode != 0 and stopped == 2, proc.stderr[-3000:]
    assert read_checkpoint(tmp_path / "stopped" / "checkpoint.safetensors")[1]["partial"]["step"] == 5
    torchrun(2, common + [f"out={tmp_path / 'stopped'}", "--resume"], tmp_path)
    _same_run(tmp_path / "whole", tmp_path / "stopped")


@pytest.mark.slow
def test_a_multi_gpu_sweep_cell_runs_both_stages_under_torchrun_like_one_process(tmp_path, monkeypatch):
    from ccar.sweep import _run_cell, expand

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    base = {"dataset": "csv", "data_root": str(root), "val_fraction": 0, "model": {"name": "mlp", "hidden": []},
            "epochs": 2, "optim": {"lr": 0.05}, "threads": 1}
    rows = {}
    for nproc, batch in ((1, 16), (2, 8)):  # the same global batch (batch_size is per process)
        spec = {"base": {**base, "optim": {"lr": 0.05, "batch_size": batch}}, "seeds": [0],
                "methods": {f"CE+{m}": {"loss.name": "ce", "stage2": {"method": m, **({} if m == "ncm" else {"epochs": 2})}}
                            for m in ("crt", "las", "ncm")}}
        cells = expand(spec)  # CE+crt trains the first stage; the LAS and NCM cells re-use it (cell.shares)
        folder = tmp_path / f"x{nproc}"
        rows[nproc] = {c.method: _run_cell(c, str(folder / c.method), 1, None if i == 0 else str(folder / "CE+crt"),
                                           nproc=nproc) for i, c in enumerate(cells)}
        assert [c.shares for c in cells] == [None, cells[0].key, cells[0].key]
    assert (tmp_path / "x2" / "CE+crt.launch.yaml").exists()
    assert (tmp_path / "x2" / "CE+las-las" / "metrics.json").exists()
    for method in ("CE+crt", "CE+las", "CE+ncm"):
        one, two = rows[1][method], rows[2][method]
        assert one["stage1_top1"] == two["stage1_top1"], method
        assert one["metrics"]["per_class"] == two["metrics"]["per_class"], method
    assert rows[2]["CE+las"]["config"]["loss"]["name"] == "las" and rows[2]["CE+ncm"]["config"]["retrain"] == "ncm"
