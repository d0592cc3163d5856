"""RandAugment, AutoAugment and Cutout on uint8 batches: shapes, grey images, the Cutout square, errors, resume."""

import builtins

import pytest
import torch

from ccar import ConfigError
from ccar.data.policies import BatchPolicy, cutout
from ccar.engine.config import load_config, validate


def test_cutout_zeroes_one_square_clipped_at_the_border():
    torch.manual_seed(0)
    out = cutout(torch.ones(64, 1, 12, 12), 6)
    full = 0
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == len(rows) and h <= 6 and w <= 6  # one filled rectangle, at most the square
        full += (h, w) == (6, 6)
    assert 0 < full < 64  # whole squares inside the image, clipped ones at its border


@pytest.mark.parametrize("name", ["randaugment", "autoaugment"])
def test_policies_keep_uint8_batches_and_are_grey_safe(name):
    """A grey batch goes through the colour operations as three equal channels: the one channel that comes back
    is what the three-channel path gives (its channels stay equal)."""
    grey = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    policy = BatchPolicy(name, n=2, m=10)
    torch.manual_seed(1)
    out = policy(grey)
    assert out.dtype == torch.uint8 and out.shape == grey.shape and not torch.equal(out, grey)
    torch.manual_seed(1)
    colour = policy.policy(grey.float().div(255).expand(-1, 3, -1, -1))
    assert torch.allclose(colour[:, 0], colour[:, 2], atol=1e-6)
    assert torch.equal(out[:, 0], colour[:, 0].mul(255).round().clamp(0, 255).to(torch.uint8))
    rgb = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert policy(rgb).shape == rgb.shape


def test_policy_errors_name_the_problem(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="augment.policy must be one of none, randaugment, autoaugment"):
        validate(load_config(None, ["augment.policy=trivial"]))
    with pytest.raises(ConfigError, match="augment.m must be a magnitude in 0..30"):
        validate(load_config(None, ["augment.policy=randaugment", "augment.m=31"]))
    with pytest.raises(ConfigError, match="apply to uint8 image batches"):
        BatchPolicy("none", cutout_size=4)(torch.zeros(4, 3))
    real_import = builtins.__import__

    def no_kornia(name, *args, **kwargs):
        if name.startswith("kornia"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kornia)
    with pytest.raises(ConfigError, match=r"needs kornia: pip install 'ccar\[augment\]'"):
        BatchPolicy("randaugment")


def test_a_policy_on_a_table_is_refused_before_training(tmp_path):
    from ccar.engine.train import train
    from conftest import make_csv

    cfg = load_config(None, ["dataset=csv", f"data_root={make_csv(tmp_path / 'csv')}", "augment.cutout=4",
                             "epochs=1", f"out={tmp_path / 'r'}", "progress=false"])
    with pytest.raises(ConfigError, match="apply to images; this run trains on vectors"):
        train(cfg, log=lambda *_: None)
