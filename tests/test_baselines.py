"""Strong baselines beside CCAR: re-sampling, cRT/LWS, tau-norm, MaxNorm (weight balancing), VS loss, global BN."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file

from ccar import ConfigError, DataError, LossError
from ccar.cli import main
from ccar.data import ClassSampler, DeviceLoader, class_sampling_probs
from ccar.data.sampling import shard
from ccar.engine.config import load_config
from ccar.engine.decoupling import tau_normalized_weight
from ccar.engine.retrain import retrain, retrain_config
from ccar.engine.train import train
from ccar.losses import build_loss, vs_loss
from conftest import make_idx_dataset

FAST = ["model.width=4", "optim.batch_size=32", "optim.lr=0.05", "threads=1", "progress=false"]
COUNTS = [400, 100, 25, 4]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=10)


def cfg_args(root, out, *extra, epochs=3):
    return ["dataset=mnist-lt", f"data_root={root}", "imbalance=10", f"epochs={epochs}", f"out={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def first_stage(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "ce"
    train(load_config(None, cfg_args(digits, out, "loss.name=ce")), log=lambda *_: None)
    return out


# --- sampling probabilities -------------------------------------------------------------------------------------------


def test_sampling_probabilities_by_hand():
    n = np.array(COUNTS, dtype=float)
    assert np.allclose(class_sampling_probs(COUNTS, "instance"), n / n.sum())
    assert np.allclose(class_sampling_probs(COUNTS, "class-balanced"), [0.25] * 4)
    assert np.allclose(class_sampling_probs(COUNTS, "sqrt"), np.array([20, 10, 5, 2]) / 37)
    for t, T in [(0, 10), (3, 10), (10, 10)]:
        want = (1 - t / T) * n / n.sum() + (t / T) * 0.25
        got = class_sampling_probs(COUNTS, "progressive", epoch=t, epochs=T)
        assert got.dtype == np.float64 and got.sum() == pytest.approx(1.0) and np.allclose(got, want)
    with pytest.raises(DataError, match="sampler must be one of"):
        class_sampling_probs(COUNTS, "oversample")


@pytest.mark.parametrize("sampler", ["instance", "class-balanced", "sqrt", "progressive"])
def test_empirical_class_frequencies_within_binomial_tolerance(sampler):
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    s = ClassSampler(targets, sampler, epochs=4, seed=3)
    draws = torch.cat([targets[ClassSampler(targets, sampler, epochs=4, seed=k).indices(2)] for k in range(40)])
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    p = torch.from_numpy(class_sampling_probs(COUNTS, sampler, epoch=2, epochs=4))
    tolerance = 4 * torch.sqrt(p * (1 - p) / len(draws))  # 4 sigma: a fixed seed, so this never flakes
    assert torch.all((freq - p).abs() <= tolerance), (freq, p)
    if sampler == "instance":  # a permutation: every sample exactly once
        assert sorted(s.indices(0).tolist()) == list(range(len(targets)))


def test_deferred_resampling_switches_at_sampler_epoch_and_is_reproducible():
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    s = ClassSampler(targets, "class-balanced", sampler_epoch=2, epochs=5, seed=1)
    assert [s.active(e) for e in range(5)] == ["instance"] * 2 + ["class-balanced"] * 3
    assert sorted(s.indices(1).tolist()) == list(range(len(targets)))  # still a permutation
    late = s.indices(2)
    assert len(late) == len(targets) and len(set(late.tolist())) < len(targets)  # drawn with replacement
    assert torch.equal(late, ClassSampler(targets, "class-balanced", 2, 5, seed=1).indices(2))  # resume: same draw


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_shards_are_disjoint_strides_of_the_global_sequence(world_size):
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])  # 529 rows: padding is needed
    seq = ClassSampler(targets, "sqrt", seed=7).indices(4)
    shards = [shard(seq, r, world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    interleaved = torch.stack(shards, 1).reshape(-1)
    assert torch.equal(interleaved[: len(seq)], seq)  # the union, in order, is the single-process sequence
    positions = [set(range(r, len(interleaved), world_size)) for r in range(world_size)]
    assert all(not (a & b) for i, a in enumerate(positions) for b in positions[i + 1:])
    x = torch.zeros(len(targets), 1)
    loaders = [DeviceLoader(x, targets, 16, shuffle=True, seed=7, rank=r, world_size=world_size, sampler="sqrt")
               for r in range(world_size)]
    for loader in loaders:
        loader.set_epoch(4)
    got = [torch.cat([y for _, y in loader]) for loader in loaders]
    assert all(torch.equal(g, targets[s]) for g, s in zip(got, shards))


def test_resampled_training_runs_and_resumes_bit_identically(digits, tmp_path):
    opts = ("sampler=class-balanced", "sampler_epoch=1", "optim.schedule=constant")  # lr independent of `epochs`
    train(load_config(None, cfg_args(digits, tmp_path / "a", *opts, epochs=3)), log=lambda *_: None)
    train(load_config(None, cfg_args(digits, tmp_path / "b", *opts, epochs=2)), log=lambda *_: None)
    train(load_config(None, cfg_args(digits, tmp_path / "b", *opts, epochs=3)), resume=True, log=lambda *_: None)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="sampler_epoch must be an epoch in 0..2"):
        load_config(None, cfg_args(digits, tmp_path / "c", "sampler_epoch=3"))


# --- VS loss ------------------------------------------------------------------------------------------------------


def test_vs_loss_against_hand_computed_values():
    x = torch.tensor([[1.0, -0.5, 0.2, 0.0]])
    y = torch.tensor([2])
    n = torch.tensor(COUNTS, dtype=torch.float32)
    delta = (n / n.max()) ** 0.2
    iota = 1.5 * torch.log(n / n.sum())
    want = F.cross_entropy(x * delta + iota, y)
    assert torch.allclose(vs_loss(x, y, COUNTS), want)
    assert torch.allclose(build_loss("vs", COUNTS)(x, y), want)
    z = x * delta + iota  # CCAR over VS weights the VS loss with Omega at p_t of the adjusted logits
    p = torch.softmax(z, 1)[0, 2]
    f = COUNTS[2] / sum(COUNTS)
    omega = (math.e - f) ** (0.75 - p)  # p_t < 0.75 here
    assert p < 0.75 and torch.allclose(build_loss("ccar", COUNTS, base="vs")(x, y), omega * want)


# --- two-stage decoupling, tau-norm, MaxNorm -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["crt", "lws"])
def test_retrain_keeps_the_backbone_bit_identical(first_stage, tmp_path, method):
    out = tmp_path / method
    metrics = retrain(first_stage, [f"method={method}", "epochs=2", f"out={out}"], log=lambda *_: None)
    parent, child = load_file(first_stage / "best.safetensors"), load_file(out / "last.safetensors")
    backbone = [k for k in parent if not k.startswith("fc.")]
    assert backbone and all(torch.equal(parent[k], child[k]) for k in backbone)  # BN statistics included
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.parent == str(first_stage) and cfg.retrain == method and cfg.sampler == "class-balanced"
    assert metrics["parent"] == str(first_stage) and (out / "per_class.png").is_file()
    if method == "crt":
        assert not torch.equal(parent["fc.weight"], child["fc.weight"])
    else:  # LWS: the classifier is kept, only the per-class scales learn
        assert torch.equal(parent["fc.weight"], child["fc.classifier.weight"])
        assert not torch.equal(child["fc.scale"], torch.ones_like(child["fc.scale"]))
    assert main(["eval", str(out)]) == 0  # the retrained run evaluates like any other


def test_ncm_predicts_the_class_of_the_nearest_normalised_mean_by_hand():
    """Features (the backbone is the identity) of two classes; the means of the L2-normalised features, by hand,
    and the class of a query point by cosine similarity."""
    from ccar.engine.decoupling import set_class_means
    from ccar.engine.distributed import DistContext
    from ccar.engine.run import Run
    from ccar.engine.runtime import Precision
    from ccar.models import NormedLinear

    model = nn.Sequential()
    model.fc = NormedLinear(2, 2)
    x = torch.tensor([[3.0, 0.0], [4.0, 3.0], [0.0, 2.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    run = Run(None, None, model, torch.device("cpu"), Precision(None, "test"), DistContext(0, 1, 0), None, lambda v: v)
    means = set_class_means(run, [(x, y)])
    # class 0: ([1, 0] + [0.8, 0.6]) / 2 = [0.9, 0.3]; class 1: ([0, 1] + [-1, 0]) / 2 = [-0.5, 0.5]
    assert torch.allclose(means, torch.tensor([[0.9, 0.3], [-0.5, 0.5]]))
    query = torch.tensor([[0.1, 1.0]])  # cos to [0.9, 0.3]: 0.409; to [-0.5, 0.5]: 0.633 -> class 1
    assert torch.allclose(model(query), torch.tensor([[0.4090, 0.6332]]), atol=1e-4)
    assert model(query).argmax(1).item() == 1


def test_ncm_retrain_trains_nothing_and_evaluates_like_any_run(first_stage, tmp_path):
    out = tmp_path / "ncm"
    metrics = retrain(first_stage, ["method=ncm", f"out={out}"], log=lambda *_: None)
    parent, child = load_file(first_stage / "best.safetensors"), load_file(out / "last.safetensors")
    assert all(torch.equal(parent[k], child[k]) for k in parent if not k.startswith("fc."))
    assert child["fc.weight"].shape == parent["fc.weight"].t().shape  # a cosine head: (features, classes)
    assert metrics["epochs"] == 0 and metrics["top1"] > 20 and "nearest class mean" in metrics["selection"]
    # a validation score all the same: a sweep tunes NCM's first stage by it (without it, it kept the first candidate)
    assert 20 < metrics["val_balanced"] <= 100 and 20 < metrics["val_top1"] <= 100
    assert main(["eval", str(out)]) == 0


def test_las_target_and_loss_equal_hand_computed_values():
    """Counts 100 / 55 / 10, concave: eps = 0.1 + 0.3 sin(pi t / 2) = 0.4, 0.1 + 0.3 sin(pi/4), 0.1; a sample of
    class 1 has the target (eps/2, 1 - eps, eps/2) and the loss -sum q log softmax(z)."""
    eps1 = 0.1 + 0.3 * math.sin(math.pi / 4)
    z = torch.tensor([[1.0, 2.0, -0.5]])
    log_p = torch.log_softmax(z, 1)[0]
    want = -(eps1 / 2 * log_p[0] + (1 - eps1) * log_p[1] + eps1 / 2 * log_p[2])
    got = build_loss("las", [100, 55, 10])(z, torch.tensor([1]))
    assert torch.allclose(got, want)
    linear = build_loss("las", [100, 55, 10], smooth_shape="linear", smooth_head=0.5, smooth_tail=0.0)
    assert torch.allclose(linear.smoothing, torch.tensor([0.5, 0.25, 0.0]))
    with pytest.raises(LossError, match="las: smooth_head must be in"):
        build_loss("las", [100, 10], smooth_head=1.2)


def test_las_retrain_shifts_batchnorm_statistics_and_nothing_else_of_the_backbone(first_stage, tmp_path):
    out = tmp_path / "las"
    retrain(first_stage, ["method=las", "epochs=2", f"out={out}"], log=lambda *_: None)
    parent, child = load_file(first_stage / "best.safetensors"), load_file(out / "last.safetensors")
    stats = [k for k in parent if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in parent if not k.startswith("fc.") and k not in stats and "num_batches" not in k]
    assert stats and all(torch.equal(parent[k], child[k]) for k in weights)  # convolutions, BN affine
    assert any(not torch.equal(parent[k], child[k]) for k in stats)  # shift learning on BatchNorm
    assert not torch.equal(parent["fc.weight"], child["fc.weight"])
    assert load_config(str(out / "config.yaml")).loss.name == "las"


def test_retrain_errors(first_stage, tmp_path):
    with pytest.raises(ConfigError, match="method=crt, method=lws, method=ft, method=las, method=ncm or method=router"):
        retrain_config(first_stage, [])
    with pytest.raises(ConfigError, match="not a finished ccar run"):
        retrain_config(tmp_path, ["method=crt"])
    assert main(["retrain", str(first_stage), "method=nope"]) == 2


def test_tau_norm_zero_is_the_identity_and_auto_never_reads_test(first_stage, digits, tmp_path):
    w = torch.randn(5, 3)
    assert torch.equal(tau_normalized_weight(w, 0.0), w)
    from ccar.engine.evaluate_run import evaluate_run

    plain = evaluate_run(first_stage, "best")["metrics"]
    zero = evaluate_run(first_stage, "best", ["tau_norm=0"])["metrics"]
    assert zero["per_class"] == plain["per_class"] and zero["tau_norm"] == 0.0
    auto = evaluate_run(first_stage, "best", ["tau_norm=auto"])["metrics"]
    assert 0.0 <= auto["tau_norm"] <= 2.0 and len(auto["tau_norm_val_balanced"]) == 21
    # Poison the test labels: the choice of tau must not move (it reads the validation split only).
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for f in os.listdir(digits):
        (poisoned / f).write_bytes((digits / f).read_bytes())
    import gzip

    labels = gzip.decompress((digits / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (poisoned / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:8] + bytes(len(labels) - 8)))
    again = evaluate_run(first_stage, "best", ["tau_norm=auto", f"data_root={poisoned}"])["metrics"]
    assert again["tau_norm"] == auto["tau_norm"] and again["tau_norm_val_balanced"] == auto["tau_norm_val_balanced"]
    assert again["top1"] != auto["top1"]  # the poison did reach the test evaluation


def test_tau_norm_auto_runs_the_backbone_once_and_scores_as_full_passes(first_stage):
    from ccar.engine.build import load_run
    from ccar.engine.decoupling import TAU_GRID, TauNorm
    from ccar.engine.scoring import evaluate_split, tau_scorer

    cfg = load_config(str(first_stage / "config.yaml"), ["tau_norm=auto"])
    run = load_run(cfg, first_stage / "best.safetensors")
    calls = []
    run.model.register_forward_hook(lambda *_: calls.append(1))
    score = tau_scorer(run)
    one_pass = len(calls)
    got = {tau: score(tau) for tau in TAU_GRID}
    assert one_pass >= 1 and len(calls) == one_pass  # 21 taus scored without running the model again
    for tau in TAU_GRID:  # the same numbers as a whole forward pass per tau, to the bit
        with TauNorm(run.model, tau):
            want = evaluate_split(run, run.data.val, shifts=False)["balanced"]
        assert got[tau] == want


def test_max_norm_bounds_every_classifier_row(digits, tmp_path):
    out = tmp_path / "wb"
    train(load_config(None, cfg_args(digits, out, "loss.name=ce", "optim.max_norm=0.5", "optim.weight_decay=5e-3")),
          log=lambda *_: None)
    w = load_file(out / "last.safetensors")["fc.weight"]
    assert torch.all(w.norm(dim=1) <= 0.5 + 1e-6)


# --- BatchNorm over the global batch (CPU stand-in for SyncBatchNorm) ------------------------------------------------


def test_global_batchnorm_keeps_frozen_parameters_frozen():
    """A frozen BatchNorm (PaCo's key encoder, a frozen backbone) stays frozen: DDP would otherwise wait for its
    gradients, and the optimizer would train it under torchrun only."""
    from ccar.engine.sync_bn import convert_sync_batchnorm

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3))
    model[0].requires_grad_(False)
    model[0].weight.data.fill_(2.0)
    out = convert_sync_batchnorm(model, torch.device("cpu"))
    assert [p.requires_grad for p in out.parameters()] == [False, False, True, True]
    assert torch.equal(out[0].weight, torch.full((3,), 2.0))


def _global_bn_worker(rank, port, x, dy, out):
    import torch.distributed as dist

    from ccar.engine.sync_bn import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    part = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
    y = bn(part)
    (y * dy[rank * 4 : (rank + 1) * 4]).sum().backward()
    out[rank] = {"y": y.detach(), "dx": part.grad, "dw": bn[0].weight.grad, "mean": bn[0].running_mean.clone(),
                 "var": bn[0].running_var.clone()}
    dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch():
    import torch.multiprocessing as mp

    x, dy = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.start_processes(_global_bn_worker, args=(port, x, dy, out), nprocs=2, start_method="spawn")
    ref = torch.nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr * dy).sum().backward()
    y = torch.cat([out[0]["y"], out[1]["y"]])
    dx = torch.cat([out[0]["dx"], out[1]["dx"]])
    assert torch.allclose(y, yr, atol=1e-5) and torch.allclose(dx, xr.grad, atol=1e-5)
    assert torch.allclose(out[0]["dw"] + out[1]["dw"], ref.weight.grad, atol=1e-4)  # DDP sums then averages
    assert torch.allclose(out[0]["mean"], ref.running_mean, atol=1e-6)
    assert torch.allclose(out[1]["var"], ref.running_var, atol=1e-5)


@pytest.mark.slow
def test_sync_bn_two_processes_match_one_process(tmp_path):
    """With per-process BatchNorm, 2 x 8 and 1 x 16 drift apart; with sync_bn=true they agree up to rounding."""
    from conftest import make_csv
    from test_distributed import torchrun

    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))  # 144 rows: every global batch of 16 splits into 2 x 8
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[16]",
              "epochs=3", "loss.name=ce", "optim.lr=0.05", "threads=1", "progress=false"]
    torchrun(1, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"], tmp_path)
    torchrun(2, common + ["optim.batch_size=8", "sync_bn=true", f"out={tmp_path / 'two'}"], tmp_path)
    torchrun(2, common + ["optim.batch_size=8", f"out={tmp_path / 'local'}"], tmp_path)
    one, two, local = (load_file(tmp_path / n / "last.safetensors") for n in ("one", "two", "local"))
    err_sync = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
    err_local = max((one[k].double() - local[k].double()).abs().max().item() for k in one)
    assert err_sync < 1e-4 and err_local > 100 * err_sync, (err_sync, err_local)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["epochs"] == 3
