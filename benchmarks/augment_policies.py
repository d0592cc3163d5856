"""What augmentation policies cost users: a whole training step with each policy against the same step without.

One SGD step of ResNet-32 on a batch of 128 CIFAR-sized uint8 images (100 classes) as the trainer runs it: the
policy on the uint8 batch, normalisation, forward, loss, backward, optimizer step. Policies: Cutout (16 px),
RandAugment (n 2, m 10), AutoAugment (CIFAR-10 policy), RandAugment + Cutout; and RandAugment on a grey 28x28
batch with the default CNN (the three-channel detour). Interleaved blocks after a warm-up; medians; the "none
(control)" row shows this machine's noise.

    python benchmarks/augment_policies.py [--threads 2] [--blocks 10] [--batch 128] [--smoke]

RandAugment and AutoAugment need kornia (``pip install 'ccar[augment]'``); without it their rows are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F

from ccar.data.policies import BatchPolicy
from ccar.models import build_model
from _smoke import parse_args
from loss_overhead import interleaved


def step_costs(model_name: str, shape, blocks: int, policies: dict, batch: int = 128) -> None:
    torch.manual_seed(0)
    model = build_model(model_name, 100, shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8)
    y = torch.randint(0, 100, (batch,))

    def step(policy):
        def run():
            x = policy(images) if policy is not None else images
            x = (x.float() / 255 - 0.5) / 0.25
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    candidates = {"none": step(None), **{k: step(p) for k, p in policies.items()}, "none (control)": step(None)}
    med = interleaved(candidates, blocks, 1)
    alone = interleaved({k: (lambda p=p: p(images)) for k, p in policies.items()}, blocks, 10)
    base = med["none"]
    print(f"{model_name} {tuple(shape)}, batch {batch}: step without a policy {base * 1e3:.1f} ms")
    for name, t in med.items():
        if name != "none":
            own = f"  | the policy alone {alone[name] * 1e3:5.1f} ms = {100 * alone[name] / base:4.1f} % of the step" \
                if name in alone else ""
            print(f"  {name:<26} {t * 1e3:7.1f} ms  x{t / base:.3f}{own}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    args = parse_args(parser, dict(threads=1, blocks=1, batch=8))
    torch.set_num_threads(args.threads)
    kornia = importlib.util.find_spec("kornia") is not None  # an optional extra: measure what can be measured
    if not kornia:
        print("kornia is not installed (pip install 'ccar[augment]'): the RandAugment and AutoAugment rows are skipped")
    step_costs("resnet32", (3, 32, 32), args.blocks, {
        "cutout 16": BatchPolicy(cutout_size=16),
        **({"randaugment n2 m10": BatchPolicy("randaugment", 2, 10),
            "autoaugment cifar10": BatchPolicy("autoaugment"),
            "randaugment + cutout 16": BatchPolicy("randaugment", 2, 10, 16)} if kornia else {}),
    }, args.batch)
    if kornia:
        step_costs("cnn", (1, 28, 28), args.blocks, {"randaugment n2 m10 (grey)": BatchPolicy("randaugment", 2, 10)},
                   args.batch)


if __name__ == "__main__":
    main()
