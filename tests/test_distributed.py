"""Data-parallel training with torchrun on CPU (gloo, 2 processes) against one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import make_csv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, args, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ccar", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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
    assert w1.keys() == {"fc.weight", "fc.bias"} and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
