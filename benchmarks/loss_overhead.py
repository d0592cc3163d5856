"""What CCAR costs users: its share of a whole training step, and the loss alone at a large size.

(a) One SGD training step (forward, loss, backward, optimizer step) with CCAR(LA) against the same step with
    cross-entropy, for the default CNN on 28x28 inputs and ResNet-32 on 32x32 inputs, batch 128, 100 classes.
    Target: <= 1 % extra step time. Two numbers per model: the side-by-side step ratio (interleaved blocks; its
    noise on this machine is about +-1 %, shown by the CE-vs-CE control row), and the attribution estimate: the
    loss's own extra forward+backward time at that size, measured precisely with many repetitions, divided by
    the step time.
(b) The loss alone (forward + backward) at (1024, 1000). Target: <= 1.5x cross-entropy.

All candidates run interleaved in alternating blocks after a warm-up block; medians are reported.

    python benchmarks/loss_overhead.py [--threads 2] [--blocks 30] [--batch 128] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ccar.losses import build_loss
from ccar.models import build_model
from _smoke import parse_args


def interleaved(candidates: dict, blocks: int, reps: int) -> dict:
    """Median seconds per call of each candidate, the candidates alternating block by block."""
    times = {k: [] for k in candidates}
    for block in range(blocks + 1):  # block 0 is the warm-up
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            if block:
                times[name].append((time.perf_counter() - start) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def loss_pair(batch: int, classes: int, counts, base: str = "la"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, classes, generator=gen).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=gen)
    ccar = build_loss("ccar", counts, base=base)
    ccar.validate = False  # as in the trainer: labels are range-checked when the data is loaded
    return {"ce": lambda: F.cross_entropy(x, y).backward(), "ccar": lambda: ccar(x, y).backward()}


def training_step_share(name: str, shape, counts, blocks: int, batch: int = 128) -> None:
    torch.manual_seed(0)
    classes = len(counts)
    model = build_model(name, classes, shape).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    ccar = build_loss("ccar", counts, base="la")
    ccar.validate = False

    def step(loss_fn):
        def run():
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    ce_step = step(lambda z, t: F.cross_entropy(z, t))
    reps = 1 if name == "resnet32" else 4
    med = interleaved({"ce": ce_step, "ccar": step(ccar), "ce (control)": ce_step}, blocks, reps)
    loss_med = interleaved(loss_pair(batch, classes, counts), blocks, 200)
    extra = loss_med["ccar"] - loss_med["ce"]
    print(f"{name:>9} {tuple(shape)}: step CE {med['ce'] * 1e3:7.1f} ms | CCAR {med['ccar'] * 1e3:7.1f} ms "
          f"({100 * (med['ccar'] / med['ce'] - 1):+.2f} %) | control CE {100 * (med['ce (control)'] / med['ce'] - 1):+.2f} % "
          f"| loss alone: +{extra * 1e6:.0f} us = {100 * extra / med['ce']:.3f} % of the step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="training-step batch")
    args = parse_args(parser, dict(threads=1, blocks=1, batch=8))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, medians of {args.blocks} interleaved blocks")
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 1000, (100,), generator=gen).tolist()

    print(f"(a) one training step (forward + loss + backward + SGD step), batch {args.batch}, 100 classes; "
          "target <= 1 % extra")
    training_step_share("cnn", (1, 28, 28), counts, args.blocks, args.batch)
    # ResNet-32 steps are slow: a third of the blocks, but at least 5 (fewer only when fewer were asked for)
    training_step_share("resnet32", (3, 32, 32), counts, max(min(5, args.blocks), args.blocks // 3), args.batch)

    print("(b) the loss alone, forward + backward; target <= 1.5x cross-entropy")
    for batch, classes in [(1024, 1000), (128, 100)]:
        counts_b = torch.randint(1, 1000, (classes,), generator=gen).tolist()
        for base in ("ce", "la"):
            reps = max(5, int(2e6 / (batch * classes)))
            med = interleaved(loss_pair(batch, classes, counts_b, base), args.blocks, reps)
            print(f"  {batch:>5} x {classes:<5} CE {med['ce'] * 1e6:8.1f} us | CCAR({base}) "
                  f"{med['ccar'] * 1e6:8.1f} us | {med['ccar'] / med['ce']:.2f}x")


if __name__ == "__main__":
    main()
