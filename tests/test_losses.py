"""The loss library against method.md: test vectors, properties, equivalences, gradients, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ccar import LossError
from ccar.losses import (
    BASES,
    CCARLoss,
    balanced_softmax_loss,
    build_loss,
    ccar_loss,
    class_balanced_loss,
    cross_entropy,
    focal_loss,
    ldam_loss,
    logit_adjusted_loss,
    omega_weight,
    posthoc_logit_adjustment,
)
from ccar.losses import functional as LF

COUNTS = [500, 200, 80, 30, 12, 5]
P_TS = [0.01, 0.10, 0.50, 0.74, 0.75, 0.90, 0.999]
F_CS = [0.0005, 0.01, 0.1, 0.5]
VECTORS = [
    [2.095650, 2.090227, 2.038601, 1.803235],
    [1.915312, 1.910957, 1.869436, 1.678460],
    [1.283966, 1.282843, 1.272050, 1.220406],
    [1.010048, 1.010013, 1.009672, 1.007999],
    [1.000000, 1.000000, 1.000000, 1.000000],
    [0.921970, 0.921208, 0.914220, 0.887355],
    [0.873836, 0.872638, 0.861677, 0.820053],
]
BASE_OPTS = {"cb": {"beta": 0.99}, "cb-focal": {"beta": 0.99, "gamma": 2.0}, "focal": {"gamma": 2.0}, "la": {"tau": 1.5}}


def batch(seed=0, n=16, c=len(COUNTS), scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=dtype) * scale).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


# --- the weight itself --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(P_TS)))
def test_omega_matches_spec_vectors(i):
    got = omega_weight(torch.tensor([P_TS[i]] * 4, dtype=torch.float64), torch.tensor(F_CS, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor(VECTORS[i], dtype=torch.float64), atol=2e-6)


@given(f=st.floats(0.0, 1.0), omega=st.floats(0.05, 1.0))
def test_omega_is_one_at_the_pivot(f, omega):
    assert omega_weight(torch.tensor(omega, dtype=torch.float64), f, omega=omega).item() == pytest.approx(1.0, abs=1e-12)


@given(p=st.floats(0.0, 1.0), f=st.floats(0.0, 1.0))
def test_omega_direction_and_bounds(p, f):
    w = omega_weight(torch.tensor(p, dtype=torch.float64), f).item()
    lo, hi = (math.e - 1 + f) ** -0.25, (math.e - f) ** 0.75
    assert lo - 1e-12 <= w <= hi + 1e-12
    if f <= 0.5:  # no class holds more than half the data in a long tail
        assert 0.819 <= w <= 2.12  # method.md rounds the lower end to 0.82; (e - 0.5)^-0.25 = 0.8194
    if p < 0.75:
        assert w > 1.0
    elif p > 0.75:
        assert w < 1.0


def test_omega_weight_rejects_bad_pivot_and_base():
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(LossError, match="omega"):
            omega_weight(torch.tensor([0.5]), 0.1, omega=bad)
    with pytest.raises(LossError, match="power_base"):
        omega_weight(torch.tensor([0.5]), 0.1, base=1.0)


# --- CCAR against a composed reference -----------------------------------------------------------------------------

def reference_ccar(x, y, counts, base, omega=0.75, detach=False, normalize=None, frequency="sum", reduction="mean",
                   **opts):
    """Omega * base loss, composed from plain autograd ops (the naive implementation the fused kernel replaces)."""
    spec = LF.make_base_spec(base, counts, **opts)
    z = LF.adjusted_logits(x, y, spec)
    counts_t = torch.tensor(counts, dtype=z.dtype)
    freq = counts_t / (counts_t.sum() if frequency == "sum" else counts_t.max())
    log_pt = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    p_t = log_pt.exp()
    w = omega_weight(p_t, freq[y], omega=omega)
    w = w.detach() if detach else w
    if normalize == "batch":
        w = w / w.mean()
    per = w * LF._per_sample_base(z, y, spec, log_pt)
    return per if reduction == "none" else per.mean()


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("normalize", [None, "batch"])
def test_fused_ccar_equals_reference(base, detach, normalize):
    opts = BASE_OPTS.get(base, {})
    x1, y = batch(1)
    x2 = x1.detach().clone().requires_grad_()
    got = ccar_loss(x1, y, COUNTS, base, detach_weight=detach, normalize=normalize, **opts)
    want = reference_ccar(x2, y, COUNTS, base, detach=detach, normalize=normalize, **opts)
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_frequency_max_variant_and_detach_change_things():
    x, y = batch(2)
    raw = ccar_loss(x, y, COUNTS)
    assert not torch.allclose(raw, ccar_loss(x, y, COUNTS, frequency="max"))
    assert torch.allclose(ccar_loss(x, y, COUNTS, frequency="max"), reference_ccar(x, y, COUNTS, "ce", frequency="max"))
    g1 = torch.autograd.grad(ccar_loss(x, y, COUNTS), x)[0]
    g2 = torch.autograd.grad(ccar_loss(x, y, COUNTS, detach_weight=True), x)[0]
    assert not torch.allclose(g1, g2)


@pytest.mark.parametrize("base", BASES)
def test_ccar_with_omega_one_equals_base(base):
    """Omega forced to 1 (strength 0) must reproduce the base loss exactly: values and gradients."""
    opts = BASE_OPTS.get(base, {})
    x1, y = batch(3)
    x2 = x1.detach().clone().requires_grad_()
    a = ccar_loss(x1, y, COUNTS, base, strength=0.0, **opts)
    b = build_loss(base, COUNTS, **opts)(x2, y)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    x, y = batch(4)
    per = ccar_loss(x, y, COUNTS, reduction="none")
    got = ccar_loss(x, y, COUNTS, reduction=reduction)
    want = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    assert torch.allclose(got, want)
    if reduction == "none":
        g = torch.autograd.grad(got, x, torch.arange(len(y), dtype=torch.float32))[0]
        # against the composed reference, not against `per` (which comes from the implementation under test)
        ref = reference_ccar(x, y, COUNTS, "ce", reduction="none")
        g_ref = torch.autograd.grad((ref * torch.arange(len(y))).sum(), x)[0]
        assert torch.allclose(g, g_ref, atol=1e-6)


def test_ccar_upweights_uncertain_and_damps_confident():
    y = torch.tensor([0])
    unsure = torch.zeros(1, 6)
    sure = torch.tensor([[10.0, 0, 0, 0, 0, 0]])
    assert ccar_loss(unsure, y, COUNTS) > cross_entropy(unsure, y)
    assert ccar_loss(sure, y, COUNTS) < cross_entropy(sure, y)


# --- base-loss equivalences ------------------------------------------------------------------------------------------


def test_ce_matches_torch():
    x, y = batch(5)
    assert torch.allclose(cross_entropy(x, y), F.cross_entropy(x, y))


def test_balanced_softmax_equals_la_tau_one():
    x, y = batch(6)
    assert torch.allclose(balanced_softmax_loss(x, y, COUNTS), logit_adjusted_loss(x, y, COUNTS, tau=1.0), atol=1e-6)


def test_cb_beta_zero_is_ce_and_focal_gamma_zero_is_ce():
    x, y = batch(7)
    assert torch.allclose(class_balanced_loss(x, y, COUNTS, beta=0.0), cross_entropy(x, y), atol=1e-6)
    assert torch.allclose(focal_loss(x, y, gamma=0.0), cross_entropy(x, y), atol=1e-6)
    assert torch.allclose(class_balanced_loss(x, y, COUNTS, beta=0.0, form="focal", gamma=2.0), focal_loss(x, y, 2.0))


def test_cb_mean_is_plain_batch_mean():
    x, y = batch(8)
    w = LF.class_balanced_weights(torch.tensor(COUNTS, dtype=torch.float64), 0.999).float()
    assert w.sum().item() == pytest.approx(len(COUNTS), rel=1e-6)
    want = (w[y] * F.cross_entropy(x, y, reduction="none")).mean()
    assert torch.allclose(class_balanced_loss(x, y, COUNTS, beta=0.999), want)


def test_focal_matches_formula():
    x, y = batch(9)
    p = torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    want = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(focal_loss(x, y, gamma=2.0), want, atol=1e-6)


def test_ldam_margins_and_formula():
    m = LF.ldam_margins(torch.tensor(COUNTS, dtype=torch.float64), 0.5)
    assert m.max().item() == pytest.approx(0.5) and m.argmax().item() == len(COUNTS) - 1
    x, y = batch(10, scale=0.3)
    onehot = F.one_hot(y, len(COUNTS)).float()
    want = F.cross_entropy(30.0 * (x - m.float()[y][:, None] * onehot), y)
    assert torch.allclose(ldam_loss(x, y, COUNTS), want, atol=1e-5)


def test_posthoc_adjustment_moves_predictions_to_tail():
    x, _ = batch(11, n=256, scale=1.0)
    before = x.argmax(1)
    after = posthoc_logit_adjustment(x, COUNTS).argmax(1)
    # Every changed prediction moves to a rarer class (higher index = fewer samples here).
    changed = before != after
    assert changed.any() and (after[changed] > before[changed]).all()
    assert (after >= len(COUNTS) // 2).sum() > (before >= len(COUNTS) // 2).sum()


def test_drw_switches_weights_on_at_its_epoch():
    loss_fn = build_loss("ldam", COUNTS, drw_epoch=3)
    x, y = batch(12, scale=0.3)
    loss_fn.set_epoch(2)
    before = loss_fn(x, y)
    assert torch.allclose(before, ldam_loss(x, y, COUNTS))
    loss_fn.set_epoch(3)
    after = loss_fn(x, y)
    w = LF.class_balanced_weights(torch.tensor(COUNTS, dtype=torch.float64), 0.9999).float()
    spec = LF.make_base_spec("ldam", COUNTS)
    want = (w[y] * F.cross_entropy(LF.adjusted_logits(x, y, spec), y, reduction="none")).mean()
    assert torch.allclose(after, want, atol=1e-5)


def test_ccar_over_ldam_drw_matches_reference_after_the_switch():
    loss_fn = build_loss("ccar", COUNTS, base="ldam", drw_epoch=1)
    x1, y = batch(18, scale=0.3)
    x2 = x1.detach().clone().requires_grad_()
    loss_fn.set_epoch(1)
    got = loss_fn(x1, y)
    w = LF.class_balanced_weights(torch.tensor(COUNTS, dtype=torch.float64), 0.9999).float()
    spec = LF.make_base_spec("ldam", COUNTS)
    z = LF.adjusted_logits(x2, y, spec)
    log_pt = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    freq = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    want = (omega_weight(log_pt.exp(), freq[y]) * w[y] * -log_pt).mean()
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


# --- gradients and numerics ------------------------------------------------------------------------------------------


ALL_LOSSES = [(name, BASE_OPTS.get(name, {})) for name in BASES] + [
    ("ccar", {"base": b, **BASE_OPTS.get(b, {})}) for b in BASES
] + [("ccar", {"base": "la", "normalize": "batch"})]
# A detached Omega is deliberately not the derivative of the loss value, so gradcheck does not apply to it; its
# gradient is checked against the composed reference above.
DETACHED = [("ccar", {"base": "ce", "detach_weight": True})]


@pytest.mark.parametrize("name,opts", ALL_LOSSES, ids=lambda v: str(v))
def test_gradcheck_float64(name, opts):
    loss_fn = build_loss(name, COUNTS, **opts).double()
    x, y = batch(13, n=5, scale=0.5 if opts.get("base", name) == "ldam" else 2.0, dtype=torch.float64)
    # p_t must not sit on the pivot, where Omega's derivative jumps.
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, y), (x,), eps=1e-6, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    c=st.integers(2, 7),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    bf16=st.booleans(),
    which=st.sampled_from(ALL_LOSSES + DETACHED),
    seed=st.integers(0, 2**16),
)
def test_finite_values_and_gradients_anywhere(n, c, magnitude, bf16, which, seed):
    name, opts = which
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 1000, (c,), generator=g).tolist()
    loss_fn = build_loss(name, counts, **opts)
    x = ((torch.rand(n, c, generator=g) * 2 - 1) * magnitude).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = x * 1.0
        loss = loss_fn(logits, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bf16_logits_give_float32_math():
    x, y = batch(14)
    xb = x.detach().bfloat16().requires_grad_()
    out = ccar_loss(xb, y, COUNTS)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ccar_loss(xb.detach().float(), y, COUNTS))
    out.backward()
    assert xb.grad.dtype == torch.bfloat16


# --- bad input --------------------------------------------------------------------------------------------------------


def test_targets_validation_names_the_value():
    x, _ = batch(15)
    with pytest.raises(LossError, match="target value 6 is out of range for 6 classes"):
        ccar_loss(x, torch.full((16,), 6), COUNTS)
    with pytest.raises(LossError, match="target value -1"):
        cross_entropy(x, torch.full((16,), -1))
    with pytest.raises(LossError, match="integer"):
        cross_entropy(x, torch.zeros(16))
    with pytest.raises(LossError, match="shape"):
        cross_entropy(x, torch.zeros(3, dtype=torch.long))


def test_counts_validation():
    x, y = batch(16)
    with pytest.raises(LossError, match="class_counts has 3 entries but logits have 6"):
        ccar_loss(x, y, [1, 2, 3])
    with pytest.raises(LossError, match="built for 3 classes"):
        build_loss("ce", [1, 2, 3])(x, y)
    with pytest.raises(LossError, match="class 2 has 0 training samples"):
        build_loss("la", [5, 4, 0, 1, 1, 1])
    with pytest.raises(LossError, match="negative"):
        build_loss("ccar", [5, -4, 1])
    build_loss("ccar", [5, 4, 0, 1, 1, 1])(x, y)  # CCAR over CE tolerates an empty class (f_c = 0)


def test_options_validation_lists_valid_ones():
    with pytest.raises(LossError, match="unknown loss 'nope'; valid: ce, focal"):
        build_loss("nope", COUNTS)
    with pytest.raises(LossError, match="options of 'la': tau"):
        build_loss("la", COUNTS, gamma=2)
    with pytest.raises(LossError, match="unknown base"):
        build_loss("ccar", COUNTS, base="ccar")
    with pytest.raises(LossError, match="reduction"):
        build_loss("ce", reduction="avg")
    with pytest.raises(LossError, match="omega"):
        build_loss("ccar", COUNTS, omega=0)
    with pytest.raises(LossError, match="normalize"):
        build_loss("ccar", COUNTS, normalize="yes")
    with pytest.raises(LossError, match="beta"):
        build_loss("cb", COUNTS, beta=1.0)


def test_module_moves_tables_with_to_and_reports_weights():
    loss_fn = CCARLoss(COUNTS, base="bs").double()
    x, y = batch(17, dtype=torch.float64)
    assert loss_fn(x, y).dtype == torch.float64
    w = loss_fn.weight(x, y)
    assert w.shape == (16,) and ((w > 0.8) & (w < 2.2)).all()


# --- one implementation that torch.compile and torch.func go through ---------------------------------------------


@pytest.mark.parametrize("name,opts,validate",
                         [(n, {}, True) for n in BASES] + [("ccar", {"base": b}, True) for b in BASES]
                         + [("ccar", {"base": "la", "normalize": "batch"}, True), ("ce", {"drw_epoch": 0}, True),
                            ("ccar", {"base": "la"}, False)])
def test_every_loss_from_build_loss_compiles_with_fullgraph(name, opts, validate):
    """Exactly as users get them (target range check on): one graph, the eager values and gradients; and the
    engine's copy, whose labels were checked at load time (validate off)."""
    torch._dynamo.reset()  # each case is a new function to dynamo, not a recompile of the last (limit 8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, len(COUNTS)))
    loss_fn = build_loss(name, COUNTS, **opts)
    assert loss_fn.validate
    loss_fn.validate = validate

    def step(x, y):
        return loss_fn(model(x), y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    x, y = torch.randn(32, 6), torch.randint(0, len(COUNTS), (32,))
    eager = step(x, y)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = compiled(x, y)
    got.backward()
    assert torch.allclose(got, eager, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(p.grad, w, rtol=1e-5, atol=1e-6) for p, w in zip(model.parameters(), want))
    if name == "ccar" and opts["base"] == "la" and validate:  # under compile the range check runs on the device
        with pytest.raises(RuntimeError, match="out of range for 6 classes"):
            compiled(x, torch.full((32,), len(COUNTS)))


@pytest.mark.parametrize("base,opts", [("ce", {}), ("la", {}), ("focal", {"gamma": 2.0}), ("ldam", {})])
def test_ccar_vmaps_over_a_stack_of_models(base, opts):
    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    models = [torch.nn.Linear(5, len(COUNTS)) for _ in range(3)]
    params, buffers = stack_module_state(models)
    loss_fn = CCARLoss(COUNTS, base=base, **opts)
    loss_fn.validate = False
    x = torch.randn(3, 16, 5)  # a different batch per model
    y = torch.randint(0, len(COUNTS), (3, 16))

    def loss_of(p, b, xb, yb):
        return loss_fn(functional_call(models[0], (p, b), (xb,)), yb)

    losses = vmap(loss_of)(params, buffers, x, y)
    grads = vmap(grad(loss_of))(params, buffers, x, y)
    for i, m in enumerate(models):  # each slice equals that model's own eager loss and gradient
        m.zero_grad()
        want = loss_fn(m(x[i]), y[i])
        want.backward()
        assert torch.allclose(losses[i], want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grads["weight"][i], m.weight.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(grads["bias"][i], m.bias.grad, rtol=1e-4, atol=1e-6)
