"""bf16 against float32 on this CPU, side by side in one run: one training step (forward, CCAR(LA), backward, SGD;
channels-last) of the default CNN and of ResNet-32, and the default job end to end with ``amp=off`` and ``amp=auto``
(and ``amp=bf16`` where the CPU has native bf16). The header says what oneDNN reports about bf16 here and what
``amp=auto`` therefore chooses.

    python benchmarks/bf16_speed.py [--epochs 15] [--rounds 2] [--threads 2] [--steps 10] [--batch 128] [--smoke]

On a CPU without native bf16 the bf16 step is a measurement of PyTorch's fallback kernels, and the end-to-end rows
show that ``auto`` stays float32 and costs nothing; the bf16 job is skipped there (~10x slower) unless ``--all``.
``--smoke``: batch 8, one step, one round, one epoch on generated Fashion-MNIST files; checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ccar.engine.config import load_config
from ccar.engine.setup import amp_dtype, native_bf16_cpu
from ccar.engine.train import train
from ccar.losses import build_loss
from ccar.models import build_model
from _smoke import CONFIGS, parse_args, tiny_fashion_mnist


def step_times(name: str, shape, batch: int, steps: int, rounds: int) -> dict:
    """Median seconds per training step for float32 and bf16, the two alternating by round."""
    torch.manual_seed(0)
    counts = [int(5000 * 0.01 ** (i / 9)) for i in range(10)]
    model = build_model(name, 10, shape, width=16, depth=32).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = build_loss("ccar", counts, base="la")
    x = torch.randn(batch, *shape).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = {"float32": [], "bf16": []}
    for _ in range(rounds):
        for label, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            for i in range(steps + 2):  # two warm-up steps
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if i >= 2:
                    times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def job(amp: str, epochs: int, threads: int, out: Path, data: tuple = ()) -> dict:
    cfg = load_config(str(CONFIGS / "default.yaml"), [f"amp={amp}", f"epochs={epochs}", f"out={out}", "progress=false",
                                                      f"threads={threads}", *data])
    start = time.perf_counter()
    metrics = train(cfg, log=lambda *_: None)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"wall": time.perf_counter() - start, "ips": statistics.median(h["images_per_s"] for h in log),
            "top1": metrics["top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the default job (15 is the job itself)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision and round")
    parser.add_argument("--all", action="store_true", help="run the bf16 job even without native bf16")
    parser.add_argument("--batch", type=int, default=128, help="batch of the one-step timings")
    parser.add_argument("--tiny-data", action="store_true", help="the job on generated Fashion-MNIST files (20/class)")
    args = parse_args(parser, dict(epochs=1, rounds=1, threads=1, steps=1, batch=8, tiny_data=True))
    torch.set_num_threads(args.threads)
    native = native_bf16_cpu()
    auto = amp_dtype("auto", torch.device("cpu"))
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (oneDNN): {native} -> amp=auto is "
          f"{'bf16' if auto == torch.bfloat16 else 'float32'} here")
    print("one training step (forward, CCAR(LA), backward, SGD), channels-last, median:")
    for name, shape in (("cnn", (1, 28, 28)), ("resnet32", (3, 32, 32))):
        t = step_times(name, shape, args.batch, args.steps, args.rounds)
        print(f"  {name:9s} {str(shape):12s} batch {args.batch}: float32 {1e3 * t['float32']:7.1f} ms, "
              f"bf16 {1e3 * t['bf16']:7.1f} ms -> bf16 is {t['float32'] / t['bf16']:.2f}x float32's speed")
    modes = ["off", "auto"] + (["bf16"] if native or args.all else [])
    print(f"the default job end to end ({args.epochs} epochs), {args.rounds} rounds, precisions alternating:")
    results = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        # generated files hold 20 images per class: at the default imbalance (100) the tail class would be empty
        data = (f"data_root={tiny_fashion_mnist(Path(tmp) / 'data')}", "imbalance=10") if args.tiny_data else ()
        for r in range(args.rounds):
            for mode in modes:
                res = job(mode, args.epochs, args.threads, Path(tmp) / f"{mode}-{r}", data)
                results[mode].append(res)
                print(f"  round {r + 1} amp={mode:4s}: {res['wall']:6.1f} s, {res['ips']:7,.0f} img/s training, "
                      f"test top-1 {res['top1']:.2f}")
    wall = {m: statistics.median(x["wall"] for x in v) for m, v in results.items()}
    print("median whole job: " + ", ".join(f"amp={m} {w:.1f} s ({wall['off'] / w:.2f}x float32's speed)"
                                           for m, w in wall.items()))


if __name__ == "__main__":
    main()
