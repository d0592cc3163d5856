"""The multi-expert (RIDE, SADE) and contrastive (PaCo, GPaCo, BCL) families through the engine: each trains with
and without CCAR, evaluates through its own aggregation, SADE scores its test-time aggregation, a PaCo run stopped
mid-epoch (its momentum encoder and queue in the checkpoint) resumes to the bit, and bad input is a one-line error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ccar import ConfigError
from ccar.config import load_config
from ccar.engine import checkpoint as ckpt
from ccar.engine.preemption import Preempted
from ccar.engine.train import train
from conftest import make_idx_dataset

FAST = ["dataset=mnist-lt", "imbalance=10", "model.width=4", "optim.batch_size=32", "threads=1", "progress=false",
        "amp=off"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=10)


def cfg(digits, out, *extra, epochs=2):
    return load_config(None, [f"data_root={digits}", f"epochs={epochs}", f"out={out}", *FAST, *extra])


@pytest.mark.parametrize("loss", [["loss.name=ride"], ["loss.name=ccar", "loss.base=sade"], ["loss.name=gpaco"],
                                  ["loss.name=ccar", "loss.base=paco", "model.queue=64"], ["loss.name=bcl"]])
def test_each_family_trains_and_evaluates(digits, tmp_path, loss):
    metrics = train(cfg(digits, tmp_path / "run", *loss), log=lambda *_: None)
    assert 0 <= metrics["top1"] <= 100 and len(metrics["per_class"]) == 10
    saved = load_file(tmp_path / "run" / "best.safetensors")
    if "sade" in loss[-1]:  # SADE's own protocol: every test-agnostic prior, equal and learnt weights
        agg = metrics["test_agnostic_sade"]
        assert len(agg) == 11 and all(len(v["weights"]) == 3 and abs(sum(v["weights"]) - 1) < 1e-3 for v in agg.values())
        assert "experts.2.fc.weight" in saved or any(k.startswith("experts.2.") for k in saved)
    if "model.queue=64" in loss:
        assert "queue" in saved and any(k.startswith("key_encoder.") for k in saved)


def test_a_paco_run_stopped_mid_epoch_resumes_bit_identically(digits, tmp_path, monkeypatch):
    args = ["loss.name=paco", "model.queue=64"]
    train(cfg(digits, tmp_path / "full", *args), log=lambda *_: None)
    monkeypatch.setenv(ckpt.FAULT_ENV, "signal:5:SIGTERM")
    with pytest.raises(Preempted):
        train(cfg(digits, tmp_path / "cut", *args), log=lambda *_: None)
    monkeypatch.delenv(ckpt.FAULT_ENV)
    train(cfg(digits, tmp_path / "cut", *args), resume=True, log=lambda *_: None)
    a, b = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    assert ma["per_class"] == mb["per_class"]


@pytest.mark.parametrize("extra, message", [
    (["loss.name=ride", "model.experts=1"], "model.experts must be at least 2"),
    (["loss.name=sade", "model.experts=2"], "model.experts must be 3 for sade"),
    (["loss.name=bcl", "mix=mixup"], "mix must be none with loss bcl"),
    (["loss.name=ce", "test_time_aggregation=self-supervised"], "test_time_aggregation must be auto or none"),
])
def test_bad_family_settings_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, FAST + extra)
    assert "\n" not in str(info.value)
