"""Forward+backward time of CCAR(CE) relative to plain ``F.cross_entropy``, measured side by side on this machine.

All candidates run interleaved in alternating blocks (warm-up excluded) and the median block time is reported,
so machine noise hits them alike; the ratio of the fastest blocks (the least disturbed ones) is printed below it. CCAR is timed as users get it on CPU (the compiled kernel, see
ccar.losses.native) and on the pure-PyTorch path it falls back to without a C++ compiler; also shown is the naive
composition (Omega from tensor ops, autograd through it). Target (issue #2): CCAR(CE) <= 1.2x cross-entropy at
both sizes.

    python benchmarks/loss_overhead.py [--threads 2] [--blocks 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from ccar.losses import build_loss, native, omega_weight


def naive_ccar(logits, targets, freq):
    log_pt = torch.log_softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    return (omega_weight(log_pt.exp(), freq[targets]) * -log_pt).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.blocks} interleaved blocks")
    print(f"CCAR kernel: {native.status()}")
    cols = [("ccar", "CCAR"), ("python", "PyTorch path"), ("naive", "naive")]
    print(f"{'B x C':>12} {'CE us':>8}" + "".join(f" {title + ' us':>16} {'ratio':>6}" for _, title in cols))
    extra = {}
    for batch, classes in [(1024, 1000), (128, 100)]:
        gen = torch.Generator().manual_seed(0)
        counts = torch.randint(1, 1000, (classes,), generator=gen).tolist()
        freq = torch.tensor(counts, dtype=torch.float32) / sum(counts)
        x = torch.randn(batch, classes, generator=gen).requires_grad_()
        y = torch.randint(0, classes, (batch,), generator=gen)
        ccar = build_loss("ccar", counts, base="ce")
        candidates = {
            "ce": lambda: F.cross_entropy(x, y).backward(),
            "ccar": lambda: ccar(x, y).backward(),
            "python": lambda: ccar(x, y).backward(),  # run inside native.disabled()
            "naive": lambda: naive_ccar(x, y, freq).backward(),
        }
        reps = max(5, int(2e6 / (batch * classes)))  # ~equal work per block at both sizes
        times = {k: [] for k in candidates}
        for block in range(args.blocks + 1):  # block 0 is the warm-up
            for name, fn in candidates.items():
                with native.disabled() if name == "python" else contextlib.nullcontext():
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    if block:
                        times[name].append((time.perf_counter() - start) / reps * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(f"{batch:>5} x {classes:<5} {med['ce']:8.1f}"
              + "".join(f" {med[k]:16.1f} {med[k] / med['ce']:5.2f}x" for k, _ in cols))
        print(f"{'':>12} {'fastest blocks:':>16}" + "".join(f" {low[k] / low['ce']:22.2f}x" for k, _ in cols))
        extra[(batch, classes)] = med["ccar"] - med["ce"]
    # Context for the small size: what the extra microseconds are worth in a real training step there.
    from ccar.models import build_model

    model = build_model("resnet32", 100, (3, 32, 32))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,))
    step = lambda: F.cross_entropy(model(x), y).backward()  # noqa: E731
    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    step_us = (time.perf_counter() - start) / 3 * 1e6
    print(f"ResNet-32 fwd+bwd at batch 128 (100 classes): {step_us / 1e3:.0f} ms; CCAR's extra "
          f"{extra[(128, 100)]:.0f} us is {100 * extra[(128, 100)] / step_us:.3f}% of that step")


if __name__ == "__main__":
    main()
