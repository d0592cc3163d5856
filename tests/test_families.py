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
    (["loss.name=sade", "model.head=cosine"], "model.head must be linear or auto with loss sade"),
    (["loss.name=ccar", "loss.base=bcl", "model.head=cosine"], "model.head must be linear or auto with loss bcl"),
])
def test_bad_family_settings_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, FAST + extra)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, attrs", [
    (["loss.name=ride", "loss.diversity_weight=-0.1", "loss.base_temperature=2.0", "loss.reweight_factor=0.02",
      "loss.max_margin=0.3", "loss.scale=20"],
     {"diversity_weight": -0.1, "base_temperature": 2.0, "reweight_factor": 0.02, "max_margin": 0.3, "scale": 20.0}),
    (["loss.name=ccar", "loss.base=sade", "loss.inverse_lambda=1.0", "loss.omega=0.5"], {"inverse_lambda": 1.0}),
    (["loss.name=gpaco", "loss.alpha=0.05", "loss.beta=0.5", "loss.gamma=0.0", "loss.temperature=0.2"],
     {"alpha": 0.05, "beta": 0.5, "gamma": 0.0, "temperature": 0.2}),
    (["loss.name=ccar", "loss.base=bcl", "loss.temperature=0.1", "loss.ce_weight=1.0", "loss.contrast_weight=0.35",
      "loss.tau=0.5"], {"temperature": 0.1, "ce_weight": 1.0, "contrast_weight": 0.35, "tau": 0.5}),
])
def test_each_family_knob_reaches_its_loss(args, attrs):
    from ccar.losses import build_loss

    c = load_config(None, FAST + args)
    loss_fn = build_loss(c.loss.name, [60, 30, 10], **c.loss.options())
    assert {k: getattr(loss_fn, k) for k in attrs} == pytest.approx(attrs)
    assert loss_fn.ccar == (c.loss.name == "ccar")


def test_a_knob_of_another_loss_is_a_one_line_error_naming_the_loss_s_options(digits, tmp_path):
    from ccar.errors import LossError

    with pytest.raises(LossError, match=r"sade: unknown option\(s\) alpha; options of 'sade': inverse_lambda") as info:
        train(cfg(digits, tmp_path / "run", "loss.name=sade", "loss.alpha=0.1"), log=lambda *_: None)
    assert "\n" not in str(info.value)


def test_predict_aggregates_experts_as_trained_or_learns_their_weights_on_the_inputs(digits, tmp_path, capsys):
    """`ccar predict` of a SADE run: equal weights by default (the model's own aggregation, as `ccar eval`), or
    with test_time_aggregation=self-supervised weights learnt on the inputs (reported on stderr)."""
    import numpy as np
    from PIL import Image

    from ccar.cli import main
    from ccar.engine.predict import predict_run

    out = tmp_path / "run"
    train(cfg(digits, out, "loss.name=sade", "test_time_aggregation=none"), log=lambda *_: None)
    rng = np.random.default_rng(0)
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(40):  # the fixture's images: class c has brightness ~ 25 c
        c = i % 10
        Image.fromarray((rng.integers(0, 12, (8, 8)) + 25 * c).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    names, equal, _ = predict_run(out, [str(folder)])
    assert len(names) == 40 and torch.allclose(equal.sum(1), torch.ones(40), atol=1e-5)
    messages = []
    _, learnt, _ = predict_run(out, [str(folder)], overrides=["test_time_aggregation=self-supervised"],
                               log=messages.append)
    assert len(messages) == 1 and "expert weights" in messages[0] and "learnt on these 40 inputs" in messages[0]
    weights = [float(w) for w in messages[0].split("expert weights ")[1].split(" learnt")[0].split(", ")]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 2e-3
    assert not torch.allclose(learnt, equal) and torch.allclose(learnt.sum(1), torch.ones(40), atol=1e-5)
    again = predict_run(out, [str(folder)], overrides=["test_time_aggregation=self-supervised"])[1]
    assert torch.equal(again, learnt)  # seeded: the same weights every time
    assert main(["predict", str(out), str(folder), "test_time_aggregation=self-supervised", "--top-k", "1"]) == 0
    assert "expert weights" in capsys.readouterr().err


def test_families_in_a_sweep_report_their_pairs_and_sade_s_aggregation(digits, tmp_path):
    import yaml

    from ccar.sweep import read_results, run_sweep

    spec = {"out": str(tmp_path / "sweep"), "runs": str(tmp_path / "runs"),
            "base": {"dataset": "mnist-lt", "data_root": str(digits), "imbalance": 10, "epochs": 1, "amp": "off",
                     "model": {"width": 4}, "optim": {"batch_size": 32}, "threads": 1},
            "seeds": [0],
            "methods": {"SADE": {"loss.name": "sade"}, "CCAR-SADE": {"loss.name": "ccar", "loss.base": "sade"},
                        "GPaCo": {"loss.name": "gpaco"},
                        "RIDE+router": {"loss.name": "ride", "stage2": {"method": "router", "epochs": 1}}},
            "report": {"baselines": {"CCAR-SADE": "SADE"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    text = run_sweep(str(tmp_path / "s.yaml"), log=lambda *_: None).read_text()
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    assert sorted(r["method"] for r in rows) == ["CCAR-SADE", "GPaCo", "RIDE+router", "SADE"]
    assert "RIDE's router: experts consulted per test image" in text and "| RIDE+router | " in text
    assert "CCAR-SADE − SADE" in text and "SADE's test-time aggregation" in text
    assert "| CCAR-SADE | self-supervised |" in text and "| GPaCo | self-supervised |" not in text


@pytest.mark.parametrize("name", ["cnn", "resnet32"])
def test_a_multi_expert_model_aggregates_as_documented(name):
    """Training: the experts' logits (E, B, C) and their mean; evaluation: the expert_weights-weighted sum (equal
    weights as built; SADE's learnt weights when set), which is what eval, predict and every metric see."""
    from ccar.models.families import multi_expert

    torch.manual_seed(0)
    model = multi_expert(name, 5, (3, 16, 16), 3, 0.75, width=4, depth=8, cosine_head=False)
    x = torch.randn(6, 3, 16, 16)
    model.eval()
    z = model.expert_logits(x)
    assert z.shape == (3, 6, 5) and torch.allclose(model(x), z.mean(0), atol=1e-6)
    model.expert_weights.copy_(torch.tensor([0.2, 0.3, 0.5]))
    assert torch.allclose(model(x), 0.2 * z[0] + 0.3 * z[1] + 0.5 * z[2], atol=1e-6)
    model.train()
    out = model(x)
    assert out["experts"].shape == (3, 6, 5) and torch.allclose(out["logits"], out["experts"].mean(0), atol=1e-6)


def test_paco_s_queue_takes_the_last_keys_of_a_batch_larger_than_itself():
    from ccar.models import build_model
    from ccar.models.families import Contrastive

    torch.manual_seed(0)
    model = Contrastive(build_model("cnn", 3, (1, 8, 8), width=2), dim=4, queue=5)
    keys, targets = torch.randn(7, 4), torch.arange(7) % 3
    model._enqueue(keys, targets)
    assert torch.equal(model.queue, keys[2:]) and torch.equal(model.queue_targets, targets[2:])
    assert int(model.queue_ptr) == 0
    model._enqueue(keys[:2], targets[:2])  # then the oldest slots are overwritten first
    assert torch.equal(model.queue[:2], keys[:2]) and int(model.queue_ptr) == 2


def test_ride_s_router_trains_over_frozen_experts_and_routes_at_test_time(digits, tmp_path):
    """`ccar retrain RUN method=router`: the RIDE run's experts stay as they were, only the routers train; the
    routed model reports how many experts a test image consulted; the run evaluates and predicts as any other."""
    from ccar.engine.evaluate_run import evaluate_run
    from ccar.engine.retrain import retrain

    parent = tmp_path / "ride"
    train(cfg(digits, parent, "loss.name=ride"), log=lambda *_: None)
    lines = []
    metrics = retrain(parent, ["method=router", "epochs=1", "progress=false"], log=lines.append)
    routed = tmp_path / "ride-router"
    a, b = load_file(parent / "best.safetensors"), load_file(routed / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))  # experts frozen, BN too
    assert {k for k in b if k not in a} and all(k.startswith("router.") for k in b if k not in a)
    r = metrics["routing"]
    assert r["experts"] == 3 and 1.0 <= r["experts_per_image"] <= 3.0 and r["reached_percent"][0] == 100.0
    assert any("routed experts:" in line for line in lines)
    from ccar.engine.scoring import eval_logit_scale

    routed_cfg = load_config(str(routed / "config.yaml"))  # scored in the experts' units (s = 30), as RIDE's run
    assert eval_logit_scale(routed_cfg) == 30.0
    assert evaluate_run(routed, "best")["metrics"]["per_class"] == metrics["per_class"]


@pytest.mark.parametrize("args, message", [
    (["method=router"], "method=router routes RIDE's experts"),
])
def test_router_needs_a_ride_parent_and_a_ride_parent_needs_the_router(digits, tmp_path, args, message):
    from ccar.engine.retrain import retrain_config

    train(cfg(digits, tmp_path / "ce", "loss.name=ce", epochs=1), log=lambda *_: None)
    with pytest.raises(ConfigError, match=message):
        retrain_config(tmp_path / "ce", args)
    with pytest.raises(ConfigError, match="loss.name must be another loss: ride-router trains"):
        load_config(None, FAST + ["loss.name=ride-router"])


def test_routed_evaluation_by_hand():
    """A router that always asks gives the mean of every expert; one that never asks, the first expert alone."""
    from ccar.models.families import multi_expert

    torch.manual_seed(0)
    model = multi_expert("cnn", 4, (1, 8, 8), 3, 0.75, width=4, router_top=30).eval()
    assert model.router.top == 4  # min(router_top, classes)
    x = torch.randn(5, 1, 8, 8)
    z = model.expert_logits(x)
    with torch.no_grad():
        model.router.out.weight.zero_()
        model.router.out.bias.fill_(1.0)  # always ask
        logits, count = model.routed(x)
        assert torch.allclose(logits, z.mean(0), atol=1e-5) and count.tolist() == [3.0] * 5
        model.router.out.bias.fill_(-1.0)  # never ask
        logits, count = model.routed(x)
        assert torch.allclose(logits, z[0], atol=1e-5) and count.tolist() == [1.0] * 5
        assert torch.equal(model(x), logits)
    model.train()
    out = model(x)
    assert out["router"].shape == (5, 2) and torch.allclose(out["logits"], out["experts"].mean(0), atol=1e-6)


def test_a_multi_expert_resnet_on_large_images_starts_with_the_single_model_s_downsampling_stem():
    from ccar.models import STEM_FROM
    from ccar.models.families import multi_expert

    big = multi_expert("resnet32", 5, (3, STEM_FROM, STEM_FROM), 3, 0.75, depth=8)
    small = multi_expert("resnet32", 5, (3, 32, 32), 3, 0.75, depth=8)
    assert big.trunk[0].stride == (2, 2) and isinstance(big.trunk[3], torch.nn.MaxPool2d)
    assert small.trunk[0].stride == (1, 1) and isinstance(small.trunk[3], torch.nn.Identity)
    assert big.eval()(torch.randn(1, 3, STEM_FROM, STEM_FROM)).shape == (1, 5)
