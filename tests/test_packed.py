"""Packed models: K models trained as one program equal the same K models trained one by one."""

import pytest
import torch

from ccar.engine.packed import PackedModels, PackedStep, StackedSGD
from ccar.losses import build_loss
from ccar.models import build_model

COUNTS = [50, 20, 5]


def models(k):
    torch.manual_seed(0)
    return [build_model("cnn", 3, (1, 12, 12), width=4) for _ in range(k)]


def batches(k, steps, b=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(k, b, 1, 12, 12, generator=g), torch.randint(0, 3, (k, b), generator=g)) for _ in range(steps)]


def separate(ms, losses, data, lrs, wds, momentum=0.9, nesterov=False):
    """Each model alone: torch's SGD, no decay on 1-D parameters (the engine's grouping)."""
    for k, (m, fn) in enumerate(zip(ms, losses)):
        groups = [{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": wds[k]},
                  {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=lrs[k], momentum=momentum, nesterov=nesterov)
        m.train()
        for xs, ys in data:
            opt.zero_grad(set_to_none=True)
            fn(m(xs[k]), ys[k]).mean().backward()
            opt.step()


@pytest.mark.parametrize("nesterov", [False, True])
def test_packed_training_equals_each_model_trained_alone(nesterov):
    losses = [build_loss("ce", COUNTS, reduction="none"), build_loss("ccar", COUNTS, base="la", reduction="none")]
    lrs, wds, data = [0.1, 0.03], [5e-4, 0.0], batches(2, 5)
    alone = models(2)
    packed = PackedModels(models(2)).train()
    opt = StackedSGD(packed.params, lrs, [0.9, 0.9], wds, nesterov=nesterov)
    step = PackedStep(packed, [build_loss("ce", COUNTS), build_loss("ccar", COUNTS, base="la")], opt)
    for xs, ys in data:
        losses_k, logits = step(xs, ys)
        assert losses_k.shape == (2,) and logits.shape == (2, 6, 3)
    separate(alone, losses, data, lrs, wds, nesterov=nesterov)
    for k, m in enumerate(alone):
        mine = packed.unpack(k)
        assert mine.keys() == m.state_dict().keys()
        for name, value in m.state_dict().items():  # weights and BatchNorm running statistics, per model
            assert torch.allclose(mine[name].float(), value.float(), atol=1e-5, rtol=1e-4), (k, name)


def test_packed_models_must_share_an_architecture():
    with pytest.raises(ValueError, match="same architecture"):
        PackedModels([build_model("cnn", 3, (1, 12, 12), width=4), build_model("cnn", 3, (1, 12, 12), width=8)])
