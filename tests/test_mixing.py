"""mixup, CutMix and Remix: the label rule, the box, the loss of a mixed sample by hand, configs, training."""

import math

import pytest
import torch

from ccar import ConfigError
from ccar.engine.config import load_config, validate
from ccar.engine.mixing import mix_batch, mixed_losses, remix_lambda
from ccar.losses import build_loss


def test_remix_gives_the_label_to_the_rarer_class_of_an_imbalanced_pair():
    counts = torch.tensor([900.0, 300.0, 100.0, 10.0])
    y_i, y_j = torch.tensor([0, 3, 0, 1, 2, 0]), torch.tensor([3, 0, 1, 0, 3, 0])
    # ratios n_i/n_j: 90, 1/90, 3, 1/3, 10, 1; kappa 3, tau 0.5
    assert remix_lambda(torch.tensor(0.4), counts, y_i, y_j).tolist() == pytest.approx([0, 0.4, 0, 0.4, 0, 0.4])
    assert remix_lambda(torch.tensor(0.6), counts, y_i, y_j).tolist() == pytest.approx([0.6, 1, 0.6, 1, 0.6, 0.6])
    assert remix_lambda(torch.tensor(0.4), counts, y_i, y_j, kappa=4).tolist() == pytest.approx(
        [0, 0.4, 0.4, 0.4, 0, 0.4])  # a ratio of 3 is no longer imbalanced


def test_cutmix_pastes_one_box_and_lambda_is_the_share_kept():
    torch.manual_seed(3)
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 10, 10).contiguous()  # image k: all pixels k
    y = torch.arange(6)
    mixed, y_j, lam = mix_batch(x, y, "cutmix", alpha=1.0)
    for k in range(6):
        own = (mixed[k] == k).float().mean().item()
        assert own == pytest.approx(lam[k].item())
        assert set(mixed[k].unique().tolist()) <= {float(k), float(y_j[k])}
    with pytest.raises(ConfigError, match="mix=cutmix pastes image boxes"):
        mix_batch(torch.zeros(4, 3), torch.arange(4), "cutmix", alpha=1.0)


def test_the_ccar_loss_of_a_mixed_sample_equals_its_hand_computed_value():
    """CCAR over LA (tau 1) of one sample mixed 0.7 / 0.3 between class 0 (head) and class 2 (tail): each label's
    term with its own p_t, f_c, branch and Omega, by the formulas of method.md."""
    counts = [600, 300, 100]
    z = torch.tensor([[2.0, 0.5, -1.0]])
    lam = 0.7
    loss_fn = build_loss("ccar", counts, base="la", reduction="none")
    got = mixed_losses(loss_fn, z, torch.tensor([0]), torch.tensor([2]), torch.tensor([lam])).item()
    pi = [n / sum(counts) for n in counts]
    adj = [v + math.log(p) for v, p in zip(z[0].tolist(), pi)]  # z' = z + tau log pi
    p = [math.exp(a) / sum(math.exp(b) for b in adj) for a in adj]

    def term(y):
        f = pi[y] if p[y] < 0.75 else 1 - pi[y]
        return (math.e - f) ** (0.75 - p[y]) * -math.log(p[y])

    assert p[0] >= 0.75 > p[2]  # the head label consolidates, the tail label explores
    assert got == pytest.approx(lam * term(0) + (1 - lam) * term(2), rel=1e-6)


@pytest.mark.parametrize("override,message", [
    (["mix=mixer"], "mix must be one of none, mixup, cutmix, remix"),
    (["mix=mixup", "mix_alpha=0"], "mix_alpha must be a number > 0"),
    (["mix=mixup", "mix_prob=1.5"], r"mix_prob must be a probability in \(0, 1\]"),
    (["mix=mixup", "epochs=10", "mix_until=11"], r"mix_until must be an epoch in 1..10"),
    (["mix=remix", "remix_tau=1"], r"remix_tau must be a number in \(0, 1\)"),
])
def test_bad_mixing_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, override))
