"""The loss math of the multi-expert (RIDE, SADE) and contrastive (PaCo/GPaCo, BCL) families, and CCAR over them,
against values worked out by hand on tiny examples (plain Python math below, independent of torch)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccar.errors import LossError
from ccar.losses import build_loss
from ccar.losses.contrastive import BCLLoss, PaCoLoss, bcl_contrastive, paco_loss
from ccar.losses.experts import (RIDELoss, SADELoss, fit_expert_weights, inverse_prior, ride_class_temperatures,
                                 ride_diversity, stability_loss)

E = math.e


def log_softmax(z):
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def omega(p_t, f, w=0.75):
    """CCAR's weight, method.md section 1."""
    return (E - (f if p_t < w else 1 - f)) ** (w - p_t)


def kl(p_logits, q_logits, temps):
    """KL(softmax(p / T) || softmax(q / T)) with per-class temperatures T."""
    lp = log_softmax([a / t for a, t in zip(p_logits, temps)])
    lq = log_softmax([a / t for a, t in zip(q_logits, temps)])
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


# --- RIDE ---------------------------------------------------------------------------------------------------------

Z1, Z2 = [0.2, -0.1, 0.4], [-0.3, 0.5, 0.1]  # two experts' (cosine) logits of one sample of class 1
COUNTS = [4, 2, 1]


def ride_by_hand(y, scale, drw, ccar=False):
    margins = [0.5 * n ** -0.25 / 1.0 for n in COUNTS]  # max margin 0.5 at the rarest class (n = 1)
    ensemble = [(a + b) / 2 for a, b in zip(Z1, Z2)]
    weight, temps = 1.0, [1.0, 1.0, 1.0]
    if drw:  # class-balanced weights (beta 0.9999) and RIDE's class temperatures
        raw = [(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS]
        weight = raw[y] * 3 / sum(raw)
        w = [3 * n / 7 * 0.05 + 0.95 for n in COUNTS]
        temps = [v / max(w) for v in w]
    total = 0.0
    for z in (Z1, Z2):
        adjusted = [scale * (v - (margins[c] if c == y else 0.0)) for c, v in enumerate(z)]
        log_p = log_softmax(adjusted)
        ce = -weight * log_p[y]
        if ccar:
            ce *= omega(math.exp(log_p[y]), COUNTS[y] / 7)
        t_mean = sum(temps) / 3
        total += ce - 0.2 * t_mean ** 2 * kl([scale * v for v in ensemble], [scale * v for v in z], temps)
    return total


def ride_outputs():
    experts = torch.tensor([[Z1], [Z2]])
    return {"experts": experts, "logits": experts.mean(0)}


def test_ride_diversity_term_by_hand():
    # KL(softmax(ens) || softmax(expert)) with ens = (0, 0), expert = (2, 0): 0.5 log(0.5/p) + 0.5 log(0.5/(1-p))
    p = math.exp(2) / (math.exp(2) + 1)
    expected = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    got = ride_diversity(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # temperature 2 on both: T^2 * KL of the halved logits
    p2 = math.exp(1) / (math.exp(1) + 1)
    expected2 = 4 * (0.5 * math.log(0.5 / p2) + 0.5 * math.log(0.5 / (1 - p2)))
    got2 = ride_diversity(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 2.0)
    assert got2.item() == pytest.approx(expected2, rel=1e-6)
    # the ensemble is a constant: no gradient reaches it
    ens = torch.zeros(1, 2, requires_grad=True)
    ride_diversity(torch.tensor([[2.0, 0.0]], requires_grad=True), ens).sum().backward()
    assert ens.grad is None or not ens.grad.any()


def test_ride_class_temperatures_by_hand():
    w = [3 * n / 7 * 0.05 + 0.95 for n in COUNTS]
    assert ride_class_temperatures(COUNTS).tolist() == pytest.approx([v / max(w) for v in w], rel=1e-9)


@pytest.mark.parametrize("drw", [False, True])
def test_ride_loss_by_hand(drw):
    loss_fn = RIDELoss(COUNTS, scale=2.0, drw_epoch=3)
    loss_fn.set_epoch(3 if drw else 2)
    assert loss_fn.drw_active is drw
    got = loss_fn(ride_outputs(), torch.tensor([1]))
    assert got.item() == pytest.approx(ride_by_hand(1, 2.0, drw), rel=1e-5)


def test_ccar_over_ride_by_hand():
    loss_fn = RIDELoss(COUNTS, scale=2.0, ccar=True)
    assert loss_fn(ride_outputs(), torch.tensor([1])).item() == pytest.approx(ride_by_hand(1, 2.0, False, ccar=True),
                                                                               rel=1e-5)


# --- SADE ---------------------------------------------------------------------------------------------------------

SADE_COUNTS = [3, 6, 1]  # prior (.3, .6, .1): unsorted on purpose


def test_sade_inverse_prior_by_hand():
    # ranks: class 1 most frequent, class 0 middle, class 2 rarest -> the inversed prior swaps the extremes
    assert inverse_prior(torch.tensor([0.3, 0.6, 0.1], dtype=torch.float64)).tolist() == [0.3, 0.1, 0.6]
    loss_fn = SADELoss(SADE_COUNTS, reduction="none")
    shift3 = [math.log(0.3) - 2 * math.log(0.3), math.log(0.6) - 2 * math.log(0.1), math.log(0.1) - 2 * math.log(0.6)]
    assert loss_fn.shifts[2].tolist() == pytest.approx(shift3, rel=1e-6)
    assert loss_fn.shifts[1].tolist() == pytest.approx([math.log(v) for v in (0.3, 0.6, 0.1)], rel=1e-6)
    # zero logits: CE log 3 (expert 1), -log prior_y (balanced softmax), -log softmax(shift3)_y (inverse)
    targets = torch.tensor([0, 1, 2])
    got = loss_fn({"experts": torch.zeros(3, 3, 3)}, targets)
    prior = [0.3, 0.6, 0.1]
    expected = [math.log(3) - math.log(prior[y]) - log_softmax(shift3)[y] for y in range(3)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert SADELoss(SADE_COUNTS, inverse_lambda=0.0).shifts[2].tolist() == pytest.approx(loss_fn.shifts[1].tolist())


def test_ccar_over_sade_by_hand():
    experts = [[[0.5, -0.2, 1.0], [3.0, 0.0, -1.0]],
               [[0.5, -0.2, 1.0], [0.0, 4.0, 0.0]],
               [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]
    targets = [0, 1]
    prior = [0.3, 0.6, 0.1]
    inv = [0.3, 0.1, 0.6]
    shifts = [[0.0] * 3, [math.log(p) for p in prior], [math.log(p) - 2 * math.log(q) for p, q in zip(prior, inv)]]
    expected, branches = [], set()
    for i, y in enumerate(targets):
        total = 0.0
        for e in range(3):
            log_p = log_softmax([z + s for z, s in zip(experts[e][i], shifts[e])])
            p_t = math.exp(log_p[y])
            branches.add(p_t >= 0.75)
            total += omega(p_t, prior[y]) * -log_p[y]
        expected.append(total)
    assert branches == {True, False}  # both of Omega's branches are exercised
    got = SADELoss(SADE_COUNTS, reduction="none", ccar=True)({"experts": torch.tensor(experts)}, torch.tensor(targets))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_sade_needs_three_experts():
    loss_fn = SADELoss(SADE_COUNTS)
    with pytest.raises(LossError, match="exactly 3 experts.*model.experts=3") as info:
        loss_fn({"experts": torch.zeros(2, 4, 3)}, torch.tensor([0, 1, 2, 0]))
    assert "\n" not in str(info.value)


# --- SADE's test-time aggregation ---------------------------------------------------------------------------------


def test_stability_loss_by_hand():
    # one input, two classes, two experts; weights (.25, .75): aggregated logits are the weighted sums
    v1 = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    v2 = torch.tensor([[[0.0, 2.0]], [[0.0, 1.0]]])
    a = [0.25 * 2.0, 0.75 * 1.0]
    b = [0.0, 0.25 * 2.0 + 0.75]
    pa = [math.exp(v) for v in log_softmax(a)]
    pb = [math.exp(v) for v in log_softmax(b)]
    cos = sum(x * y for x, y in zip(pa, pb)) / math.sqrt(sum(x * x for x in pa) * sum(y * y for y in pb))
    assert stability_loss(v1, v2, torch.tensor([0.25, 0.75])).item() == pytest.approx(-cos, rel=1e-6)


def test_aggregation_weights_move_toward_the_stable_tail_expert():
    """Unlabeled inputs from a backward (tail-heavy) prior: the inverse expert is confident, right and stable across
    views on the tail; the long-tailed expert is unsure and flips between views there. The inverse expert gains."""
    g = torch.Generator().manual_seed(0)
    classes, n = 4, 400
    backward = torch.tensor([1.0, 2.0, 4.0, 8.0])  # class 3 is the training tail and the test head
    y = torch.multinomial(backward / backward.sum(), n, replacement=True, generator=g)
    onehot = F.one_hot(y, classes).float()

    def views(noise):
        return [torch.randn(n, classes, generator=g) * noise for _ in range(2)]

    head = [torch.tensor([1.5, 0.5, 0.0, -0.5]) + v for v in views(2.0)]  # long-tailed expert: head bias, unstable
    uniform = [2.0 * onehot + v for v in views(1.0)]
    inverse = [4.0 * onehot + torch.tensor([-0.5, 0.0, 0.5, 1.0]) + v for v in views(0.2)]
    v1, v2 = (torch.stack([head[i], uniform[i], inverse[i]]) for i in range(2))
    weights = fit_expert_weights(v1, v2, epochs=10, batch_size=64, generator=torch.Generator().manual_seed(1))
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights[2] > 1 / 3 > weights[0]
    assert stability_loss(v1, v2, weights) < stability_loss(v1, v2, torch.full((3,), 1 / 3))
    again = fit_expert_weights(v1, v2, epochs=10, batch_size=64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(weights, again)  # deterministic


# --- PaCo / GPaCo -------------------------------------------------------------------------------------------------


def test_paco_with_momentum_keys_by_hand():
    # B = 2 (classes 0, 1), counts (3, 1), temperature .5, alpha .5, beta = gamma = 1; queue: one class-0 key and an
    # empty slot. Anchors: the first view's features f0 = e0, f1 = e1; the bank is (f0, f1, k0, k1, queue).
    log_prior = [math.log(0.75), math.log(0.25)]
    k0, k1 = (0.6, 0.8), (0.8, -0.6)
    outputs = {
        "logits": torch.tensor([[0.5, -0.5], [0.0, 0.3], [9.0, 9.0], [9.0, 9.0]]),  # view 2's rows take no part
        "features": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]]),
        "keys": torch.tensor([k0, k1]),
        "queue": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "queue_targets": torch.tensor([0, -1]),
    }
    # anchor 0 (class 0): centres .5 + log .75, -.5 + log .25; samples f1 0, k0 .6/.5, k1 .8/.5, queue[0] 1/.5
    c = [0.5 + log_prior[0], -0.5 + log_prior[1]]
    lse = math.log(math.exp(c[0]) + math.exp(c[1]) + math.exp(0.0) + math.exp(1.2) + math.exp(1.6) + math.exp(2.0))
    loss0 = -((c[0] - lse) + 0.5 * ((1.2 - lse) + (2.0 - lse))) / (1 + 0.5 * 2)  # positives: centre, k0, queue[0]
    # anchor 1 (class 1): centres 0 + log .75, .3 + log .25; samples f0 0, k0 .8/.5, k1 -.6/.5, queue[0] 0
    c = [0.0 + log_prior[0], 0.3 + log_prior[1]]
    lse = math.log(math.exp(c[0]) + math.exp(c[1]) + math.exp(0.0) + math.exp(1.6) + math.exp(-1.2) + math.exp(0.0))
    loss1 = -((c[1] - lse) + 0.5 * (-1.2 - lse)) / (1 + 0.5 * 1)  # positives: centre, k1
    loss_fn = PaCoLoss([3, 1], reduction="none", alpha=0.5, temperature=0.5)
    assert loss_fn(outputs, torch.tensor([0, 1])).tolist() == pytest.approx([loss0, loss1], rel=1e-5)


def paco_reference(logits, feats, y, counts, alpha, beta, gamma, t):
    """GPaCo by the paper's definition, one anchor at a time (every view anchors against every other row)."""
    n, b = len(feats), len(y)
    labels = [y[i % b] for i in range(n)]
    prior = [c / sum(counts) for c in counts]
    per_row = []
    for i in range(n):
        centres = [z + math.log(p) for z, p in zip(logits[i], prior)]
        others = [j for j in range(n) if j != i]
        sims = {j: sum(a * b_ for a, b_ in zip(feats[i], feats[j])) / t for j in others}
        denom = sum(math.exp(v) for v in centres) + gamma * sum(math.exp(v) for v in sims.values())
        positives = [j for j in others if labels[j] == labels[i]]
        log_denom = math.log(denom)
        total = beta * (centres[labels[i]] - log_denom) + alpha * sum(sims[j] - log_denom for j in positives)
        per_row.append(-total / (beta + alpha * len(positives)))
    return [sum(per_row[v * b + i] for v in range(n // b)) / (n // b) for i in range(b)]


def test_gpaco_against_the_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    feats = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    y = [0, 2, 0]
    expected = paco_reference(logits.tolist(), feats.tolist(), y, [5, 3, 1], 0.3, 1.0, 0.8, 0.2)
    loss_fn = build_loss("gpaco", [5, 3, 1], reduction="none", alpha=0.3, gamma=0.8, temperature=0.2)
    got = loss_fn({"logits": logits, "features": feats}, torch.tensor(y))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_ccar_over_paco_weights_the_centre_term_only():
    lp = torch.tensor([0.75, 0.25]).log()
    z, f, y = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[1.0, 0.0]] * 2), torch.tensor([0])
    lse = math.log(0.75 * E + 0.25 + E)
    centre, sample = lse - (1 + math.log(0.75)), lse - 1
    w = omega(0.75 * E / (0.75 * E + 0.25), 0.75)
    out = {"logits": z, "features": f}
    plain = PaCoLoss([3, 1], alpha=1.0, temperature=1.0)(out, y)
    ccar = build_loss("ccar", [3, 1], base="paco", alpha=1.0, temperature=1.0)(out, y)
    assert plain.item() == pytest.approx((centre + sample) / 2, rel=1e-6)
    assert paco_loss(z, f, y, lp, alpha=1.0, temperature=1.0).item() == pytest.approx(plain.item(), rel=1e-6)
    assert ccar.item() == pytest.approx((w * centre + sample) / 2, rel=1e-6)


# --- BCL ----------------------------------------------------------------------------------------------------------


def bcl_outputs():
    return {"logits": torch.tensor([[0.4, -0.2], [0.1, 0.9], [5.0, 5.0], [5.0, 5.0]]),
            "features": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]),
            "prototypes": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}


def test_bcl_contrastive_term_by_hand():
    # anchor f0 = e0 (class 0), temperature .5: contrast set f1 (class 1) 0, g0 (class 0) 1.2, g1 (class 1) 1.6,
    # prototype 0 2.0, prototype 1 0. Class 0 has 3 members (f0, g0, p0), 2 without the anchor; class 1 has 3.
    out = bcl_outputs()
    lse = math.log((math.exp(1.2) + math.exp(2.0)) / 2 + (math.exp(0.0) + math.exp(1.6) + math.exp(0.0)) / 3)
    expected = -((1.2 - lse) + (2.0 - lse)) / 2  # positives: g0 and prototype 0
    got = bcl_contrastive(out["features"], out["prototypes"], torch.tensor([0, 1]), temperature=0.5)
    assert got[0].item() == pytest.approx(expected, rel=1e-6)


def test_bcl_loss_composes_logit_adjusted_ce_and_the_contrast():
    out, y = bcl_outputs(), torch.tensor([0, 1])
    loss_fn = BCLLoss([3, 1], reduction="none", temperature=0.5)
    prior = [0.75, 0.25]
    ce = [-log_softmax([z + math.log(p) for z, p in zip(out["logits"][i].tolist(), prior)])[y[i]] for i in range(2)]
    contrast = bcl_contrastive(out["features"], out["prototypes"], y, 0.5).view(2, 2).mean(0)
    expected = [2.0 * ce[i] + 0.6 * contrast[i].item() for i in range(2)]
    assert loss_fn(out, y).tolist() == pytest.approx(expected, rel=1e-6)
    # CCAR over BCL: Omega on the CE term only
    ccar = BCLLoss([3, 1], reduction="none", temperature=0.5, ccar=True)(out, y)
    weights = [omega(math.exp(-ce[i]), prior[y[i]]) for i in range(2)]
    assert ccar.tolist() == pytest.approx([2.0 * weights[i] * ce[i] + 0.6 * contrast[i].item() for i in range(2)],
                                          rel=1e-6)


# --- every family -------------------------------------------------------------------------------------------------


def family_case(name, scale=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, d = 4, 3, 5
    y = torch.tensor([0, 1, 2, 0])
    if name in ("ride", "sade"):
        experts = (torch.randn(3, b, c, generator=g) * scale).to(dtype)
        return {"experts": experts, "logits": experts.mean(0)}, y
    out = {"logits": (torch.randn(2 * b, c, generator=g) * scale).to(dtype),
           "features": F.normalize(torch.randn(2 * b, d, generator=g), dim=1).to(dtype)}
    if name == "bcl":
        out["prototypes"] = F.normalize(torch.randn(c, d, generator=g), dim=1).to(dtype)
    if name == "paco":
        out.update(keys=F.normalize(torch.randn(b, d, generator=g), dim=1).to(dtype),
                   queue=F.normalize(torch.randn(6, d, generator=g), dim=1).to(dtype),
                   queue_targets=torch.tensor([0, 2, -1, 1, -1, 0]))
    return out, y


FAMILIES = ["ride", "sade", "paco", "gpaco", "bcl"]
COUNTS3 = [50, 10, 2]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("ccar", [False, True])
def test_reduction_none_and_mean_agree(name, ccar):
    out, y = family_case(name)
    options = {"base": name} if ccar else {}
    per_sample = build_loss("ccar" if ccar else name, COUNTS3, reduction="none", **options)(out, y)
    assert per_sample.shape == (4,)
    mean = build_loss("ccar" if ccar else name, COUNTS3, **options)(out, y)
    total = build_loss("ccar" if ccar else name, COUNTS3, reduction="sum", **options)(out, y)
    assert mean.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(per_sample.sum().item(), rel=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_finite(name, scale):
    out, y = family_case(name, scale)
    leaves = {k: v.clone().requires_grad_(True) for k, v in out.items() if v.is_floating_point()}
    out = {**out, **leaves}
    if "experts" in out:  # the ensemble is the experts' mean, as the model makes it
        out["logits"] = out["experts"].mean(0)
    for ccar in (False, True):
        loss_fn = build_loss("ccar", COUNTS3, base=name) if ccar else build_loss(name, COUNTS3)
        loss_fn.set_epoch(0)
        loss = loss_fn(out, y)
        grads = torch.autograd.grad(loss, [v for k, v in out.items() if k in leaves and v.requires_grad],
                                    allow_unused=True)
        assert torch.isfinite(loss)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_inputs_give_float32_math(name):
    out, y = family_case(name, dtype=torch.bfloat16)
    loss_fn = build_loss("ccar", COUNTS3, base=name, reduction="none")
    got = loss_fn(out, y)
    assert got.dtype == torch.float32
    up = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    assert torch.allclose(got, loss_fn(up, y), rtol=1e-6, atol=1e-6)


def test_ccar_with_strength_zero_is_the_base_loss():
    for name in FAMILIES:
        out, y = family_case(name, seed=3)
        leaves = {k: v.clone().requires_grad_(True) for k, v in out.items() if k in ("experts", "logits")}
        base = build_loss(name, COUNTS3, reduction="none")({**out, **leaves}, y)
        (g_base,) = torch.autograd.grad(base.sum(), [leaves["experts" if "experts" in out else "logits"]])
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        off = build_loss("ccar", COUNTS3, base=name, reduction="none", strength=0.0)({**out, **leaves}, y)
        (g_off,) = torch.autograd.grad(off.sum(), [leaves["experts" if "experts" in out else "logits"]])
        assert torch.allclose(base, off, rtol=1e-6) and torch.allclose(g_base, g_off, rtol=1e-5, atol=1e-7), name


def test_detach_weight_keeps_values_changes_gradients():
    out, y = family_case("sade", seed=1)
    experts = out["experts"].clone().requires_grad_(True)
    a = build_loss("ccar", COUNTS3, base="sade")({"experts": experts}, y)
    (ga,) = torch.autograd.grad(a, experts)
    b = build_loss("ccar", COUNTS3, base="sade", detach_weight=True)({"experts": experts}, y)
    (gb,) = torch.autograd.grad(b, experts)
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and not torch.allclose(ga, gb)


# --- errors and the interface -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paco", "gpaco", "bcl"])
def test_contrastive_losses_need_two_views(name):
    out, y = family_case(name)
    loss_fn = build_loss(name, COUNTS3)
    bad_rows = {**out, "features": out["features"][:7], "logits": out["logits"][:7]}
    with pytest.raises(LossError, match="two views") as info:
        loss_fn(bad_rows, y)
    assert "\n" not in str(info.value)
    with pytest.raises(LossError, match="no 'features'"):
        loss_fn({k: v for k, v in out.items() if k != "features"}, y)
    if name != "paco":  # (with momentum keys one online view suffices: the keys are the second)
        one_view = {**out, "features": out["features"][:4], "logits": out["logits"][:4]}
        with pytest.raises(LossError, match="two views"):
            loss_fn(one_view, y)


def test_options_are_checked():
    with pytest.raises(LossError, match="unknown option.*margin_x.*max_margin"):
        RIDELoss(COUNTS3, margin_x=1)
    with pytest.raises(LossError, match="omega.*loss.name=ccar loss.base=bcl"):
        BCLLoss(COUNTS3, omega=0.8)
    with pytest.raises(LossError, match="class 1 has 0 training samples"):
        SADELoss([5, 0, 1])
    with pytest.raises(LossError, match="temperature must be > 0"):
        PaCoLoss(COUNTS3, temperature=0.0)
    with pytest.raises(LossError, match="dict of training outputs"):
        SADELoss(COUNTS3)(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(LossError, match="out of range"):
        SADELoss(COUNTS3)({"experts": torch.zeros(3, 2, 3)}, torch.tensor([0, 3]))


def test_interface_for_the_engine():
    for name in FAMILIES:
        loss_fn = build_loss("ccar", COUNTS3, base=name, omega=0.8)
        assert loss_fn.takes_outputs and loss_fn.ccar and loss_fn.validate
        assert "omega=0.8" in repr(loss_fn) and "ccar=True" in repr(loss_fn)
        loss_fn.reduction = "none"  # (the engine's step sets it after construction)
        out, y = family_case(name)
        assert loss_fn(out, y).shape == (4,)
    ride = build_loss("ride", COUNTS3, drw_epoch=2)
    assert not ride.drw_active
    ride.set_epoch(2)
    assert ride.drw_active and "drw_epoch=2" in repr(ride)
    assert not build_loss("sade", COUNTS3).drw_active


def test_the_methods_page_worked_examples():
    """docs/methods.md's hand-worked SADE and PaCo examples, as the library computes them."""
    y, out = torch.tensor([0]), {"experts": torch.zeros(3, 1, 2)}
    assert SADELoss([3, 1])(out, y).item() == pytest.approx(1.017197, abs=1e-6)
    assert build_loss("ccar", [3, 1], base="sade")(out, y).item() == pytest.approx(1.138656, abs=1e-6)
    assert SADELoss([3, 1]).shifts[2].tolist() == pytest.approx([2.484907, -0.810930], abs=1e-6)
    pac = {"logits": torch.tensor([[1.0, 0.0]] * 2), "features": torch.tensor([[1.0, 0.0]] * 2)}
    assert PaCoLoss([3, 1], alpha=1.0, temperature=1.0)(pac, y).item() == pytest.approx(0.754677, abs=1e-6)
    assert build_loss("ccar", [3, 1], base="paco", alpha=1.0, temperature=1.0)(pac, y).item() == pytest.approx(
        0.701021, abs=1e-6)


def test_ride_router_targets_and_loss_by_hand():
    from ccar.losses.router import router_loss, router_targets

    # image 0: expert 1 wrong, 1+2 right -> router 1 asks, router 2 (1+2 right already) does not
    # image 1: every ensemble wrong -> nobody asks (no larger ensemble is right)
    # image 2: 1 and 1+2 wrong, 1+2+3 right -> both ask
    z = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]],
                      [[3.0, 0.0], [0.0, 0.0], [0.0, 0.5]],
                      [[0.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])
    y = torch.tensor([0, 0, 0])
    assert router_targets(z, y).tolist() == [[True, False], [False, False], [True, True]]
    logits = torch.tensor([[0.5, -1.0], [0.0, 2.0], [1.0, 1.0]])
    sp = lambda v: math.log1p(math.exp(v))  # softplus: BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)
    expected = [(4 * sp(-0.5) + sp(-1.0)) / 2, (sp(0.0) + sp(2.0)) / 2, (4 * sp(-1.0) + 4 * sp(-1.0)) / 2]
    assert router_loss(z, logits, y, pos_weight=4.0).tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(LossError, match="must be \\(B, E-1\\) = \\(3, 2\\)"):
        router_loss(z, torch.zeros(3, 3), y)
    with pytest.raises(LossError, match="ccar: unknown base 'ride-router'"):
        build_loss("ccar", [3, 1], base="ride-router")
    with pytest.raises(LossError, match="CCAR does not apply"):
        build_loss("ride-router", [3, 1], ccar=True)
    with pytest.raises(LossError, match="ride-router: unknown option\\(s\\) omega; options of 'ride-router': "
                                        "pos_weight, scale, reduction$"):
        build_loss("ride-router", [3, 1], omega=0.5)
