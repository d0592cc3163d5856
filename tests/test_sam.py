"""SAM, ASAM and ImbSAM steps against hand-computed references; gradient accumulation; their configs; resume
(with mixing and augmentation policies too: their draws are part of the saved random state)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ccar import ConfigError
from ccar.engine import checkpoint as ckpt
from ccar.engine.config import load_config
from ccar.engine.distributed import DistContext
from ccar.engine.sam import SAM, held_batchnorm, sam_backward
from ccar.engine.train import train
from conftest import make_csv, make_idx_dataset

X = np.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.3], [2.0, 1.0]])
Y = np.array([0, 1, 2, 2])
W0 = np.array([[0.2, -0.1], [0.05, 0.3], [-0.4, 0.1]])  # (classes, features)
TAIL = np.array([False, False, True])  # class 2 is the tail


def ce_gradient(w, rows):
    """d/dW of sum_i∈rows CE(x_i W^T, y_i) / N, by hand: (softmax - onehot)^T x / N."""
    z = X @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(Y)), Y] -= 1
    return (p * rows[:, None]).T @ X / len(Y)


def step_by_hand(rho, lr, adaptive=False, tail=False):
    everyone = np.ones(len(Y))
    in_tail = TAIL[Y].astype(float) if tail else everyone
    g = ce_gradient(W0, in_tail)
    t = np.abs(W0) + 0.01 if adaptive else np.ones_like(W0)
    eps = rho * t * t * g / np.linalg.norm(t * g)
    update = ce_gradient(W0 + eps, in_tail) + (ce_gradient(W0, everyone - in_tail) if tail else 0)
    return W0 - lr * update


def step_by_ccar(rho, lr, adaptive=False, tail=False):
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0, dtype=torch.float32))
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
    losses = lambda: F.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    sam = SAM(model.parameters(), rho, adaptive)
    sam_backward(sam, model, losses(), y, losses, DistContext(0, 1, 0), torch.tensor(TAIL) if tail else None)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return model.weight.detach().double().numpy()


@pytest.mark.parametrize("adaptive,tail", [(False, False), (True, False), (False, True)], ids=["sam", "asam", "imbsam"])
def test_one_step_equals_the_hand_computed_update(adaptive, tail):
    expected = step_by_hand(rho=0.5, lr=0.1, adaptive=adaptive, tail=tail)
    assert np.allclose(step_by_ccar(rho=0.5, lr=0.1, adaptive=adaptive, tail=tail), expected, atol=1e-6)
    plain = W0 - 0.1 * ce_gradient(W0, np.ones(len(Y)))
    assert not np.allclose(expected, plain, atol=1e-4)  # the perturbation changed the step


def test_the_second_pass_leaves_batchnorm_statistics_alone():
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    before = bn.running_mean.clone()
    with held_batchnorm(bn):
        bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)) + 5)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1


FAST = ["model.width=4", "optim.batch_size=32", "optim.lr=0.05", "threads=1", "progress=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=10)


def _cfg(root, out, *extra, epochs=2):
    return load_config(None, ["dataset=mnist-lt", f"data_root={root}", "imbalance=10", f"epochs={epochs}",
                              f"out={out}", *FAST, *extra])


@pytest.mark.parametrize("extra", [["optim.sam=0.05", "optim.sam_scope=tail"], ["optim.accumulate=3"],
                                   ["mix=cutmix", "mix_prob=0.5"], ["mix=remix", "optim.sam=0.05"],
                                   ["augment.policy=randaugment", "augment.cutout=6"]],
                         ids=["imbsam", "accumulate", "cutmix", "remix-sam", "randaugment-cutout"])
def test_a_run_cut_mid_epoch_resumes_bit_identically(digits, tmp_path, monkeypatch, extra):
    """A CNN with BatchNorm; checkpoint_minutes tiny: a mid-epoch checkpoint at every optimizer step; the run is
    killed after the 5th and resumed."""
    every = ["checkpoint_minutes=1e-9", *extra]
    full = train(_cfg(digits, tmp_path / "full", *every), log=lambda *_: None)
    real_save, calls = ckpt.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(digits, tmp_path / "cut", *every), log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    meta = ckpt.read_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")[1]
    assert meta["partial"]["step"] % (3 if "optim.accumulate=3" in extra else 1) == 0  # between optimizer steps
    logs = []
    resumed = train(_cfg(digits, tmp_path / "cut", *every), resume=True, log=logs.append)
    assert resumed["last"] == full["last"] and any("resuming from its checkpoint: epoch " in l and "after step" in l for l in logs)
    wa, wb = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_accumulating_k_batches_is_one_batch_k_times_larger(tmp_path):
    """A linear model (no BatchNorm): 2 x 8 accumulated steps like batches of 16, to float precision, and the run
    says its effective batch and the linear lr-scaling rule."""
    root = make_csv(tmp_path / "csv", counts=(96, 32, 16))
    common = ["dataset=csv", f"data_root={root}", "val_fraction=0", "model.name=mlp", "model.hidden=[]", "epochs=2",
              "loss.name=ccar", "loss.base=la", "optim.lr=0.05", "threads=1", "progress=false"]
    logs = []
    train(load_config(None, common + ["optim.batch_size=16", f"out={tmp_path / 'one'}"]), log=lambda *_: None)
    train(load_config(None, common + ["optim.batch_size=8", "optim.accumulate=2", f"out={tmp_path / 'acc'}"]),
          log=logs.append)
    assert any("effective batch 2 x 8 per process x 1 process = 16" in l for l in logs)
    w1, w2 = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "acc" / "last.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


@pytest.mark.parametrize("override,message", [
    (["optim.sam=-1"], "optim.sam must be a radius >= 0"),
    (["optim.sam_adaptive=true"], "optim.sam must be a radius > 0 when optim.sam_adaptive"),
    (["optim.sam=0.05", "optim.sam_scope=head"], "optim.sam_scope must be one of all, tail"),
    (["optim.sam=0.05", "optim.accumulate=2"], "optim.accumulate must be 1 with optim.sam"),
    (["optim.accumulate=0"], "optim.accumulate must be an integer >= 1"),
])
def test_bad_sam_and_accumulation_settings_are_named(tmp_path, override, message):
    from ccar.engine.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, override))


def test_a_tail_threshold_that_leaves_no_tail_class_is_an_error(digits, tmp_path):
    with pytest.raises(ConfigError, match="optim.sam_tail_below=1 leaves no tail class"):
        train(_cfg(digits, tmp_path / "r", "optim.sam=0.05", "optim.sam_scope=tail", "optim.sam_tail_below=1"),
              log=lambda *_: None)
