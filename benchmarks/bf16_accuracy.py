"""Does bf16 change what the default job learns? The default job (configs/default.yaml) trained in float32 and in
bf16 autocast for several seeds, with the paired difference of test top-1 and balanced accuracy (95 % paired-t
intervals). This is the evidence behind ``amp=auto`` (docs/benchmarks.md).

    python benchmarks/bf16_accuracy.py [--seeds 0 1 2 3 4] [--out runs/bf16-accuracy] [--jobs 2] [--smoke]

On a CPU with native bf16 (oneDNN reports it: AVX-512 BF16 or AMX) both precisions run as they would for a user.
Without it, PyTorch's CPU convolution in bf16 falls back to a reference kernel about 10x slower than float32
(measured: ~1.0 s against ~0.1 s per default-CNN step here), so a 5-seed comparison would take hours; there the
script *emulates* bf16 convolutions the way the native kernels compute them: operands rounded to bf16, products
accumulated in float32, the output rounded to bf16 (and the same for the gradients in backward, which autograd of
the casts gives). Every other op runs in real bf16 under autocast. ``--check`` prints how close the emulation is
to PyTorch's own (slow) bf16 convolution on one training step, next to the float32 difference.
Runs resume: a finished (precision, seed) is read back from its ``metrics.json``. ``--smoke``: ``--check`` at batch 8,
then one seed of a one-epoch job on generated Fashion-MNIST files in a temporary folder; checks that the script works.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ccar.engine.setup import native_bf16_cpu
from _smoke import CONFIGS, parse_args, tiny_fashion_mnist


def emulate_bf16_convolutions() -> None:
    """Patch ``nn.Conv2d`` so that under bf16 autocast it computes in float32 over bf16-rounded operands and
    returns a bf16 result (what oneDNN's bf16 kernels do, fp32 accumulation); float32 runs are untouched."""
    original = nn.Conv2d._conv_forward

    def conv_forward(self, x, weight, bias):
        if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return original(self, x, weight, bias)
        with torch.autocast("cpu", enabled=False):
            bf = lambda t: None if t is None else t.to(torch.bfloat16).float()  # noqa: E731
            return original(self, bf(x), bf(weight), bf(bias)).to(torch.bfloat16)

    nn.Conv2d._conv_forward = conv_forward


def check_emulation(batch: int = 128) -> None:
    """One default-CNN training step: logits and weight gradients of emulated bf16 vs PyTorch's bf16 convolution."""
    from ccar.models import build_model

    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    reference = build_model("cnn", 10, (1, 28, 28), width=16)

    def step(model, dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        return logits.float().detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    fp32 = step(reference, None)
    real = step(reference, torch.bfloat16)
    emulate_bf16_convolutions()
    emulated = step(reference, torch.bfloat16)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"relative difference, logits / gradients: emulated vs PyTorch bf16 {rel(emulated[0], real[0]):.4f} / "
          f"{rel(emulated[1], real[1]):.4f}; float32 vs PyTorch bf16 {rel(fp32[0], real[0]):.4f} / "
          f"{rel(fp32[1], real[1]):.4f}")


def run(amp: str, seed: int, out: Path, threads: int, emulate: bool, overrides: tuple = ()) -> dict:
    from ccar.engine.config import load_config
    from ccar.engine.train import train

    if emulate and amp == "bf16":
        emulate_bf16_convolutions()
    run_dir = out / f"{amp}-s{seed}"
    if (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        cfg = load_config(str(CONFIGS / "default.yaml"), [f"seed={seed}", f"amp={amp}", f"out={run_dir}",
                                                          "progress=false", f"threads={threads}", *overrides])
        metrics = train(cfg, resume=(run_dir / "checkpoint.safetensors").exists(), log=lambda *_: None)
    return {"amp": amp, "seed": seed, "top1": metrics["top1"], "balanced": metrics["balanced"],
            "tail": metrics["groups"]["tail"], "seconds": metrics["seconds"]}


def report(rows: list, seeds: list, native: bool) -> None:
    from ccar.report.stats import mean_std, paired_ci

    by = {(r["amp"], r["seed"]): r for r in rows}
    print(f"{'':9}" + "".join(f"{'seed ' + str(s):>14}" for s in seeds) + f"{'mean ± std':>16}")
    for metric in ("top1", "tail"):  # balanced = top-1 on the balanced test set; tail: the rarest third of classes
        for amp in ("off", "bf16"):
            values = [by[amp, s][metric] for s in seeds]
            m, sd, _ = mean_std(values)
            print(f"{metric + ' ' + amp:<14}" + "".join(f"{v:14.2f}" for v in values)
                  + f"{m:10.2f} ± {sd or 0:.2f}")
        ci = paired_ci([by["bf16", s][metric] - by["off", s][metric] for s in seeds])
        interval = (f"[{ci['low']:+.2f}, {ci['high']:+.2f}] (95 % paired t)" if ci["low"] is not None
                    else f"({ci['verdict']})")  # one seed has no interval
        print(f"  bf16 - float32 {metric}: {ci['mean']:+.2f} {interval}")
    secs = {amp: sum(by[amp, s]["seconds"] for s in seeds) / len(seeds) for amp in ("off", "bf16")}
    print(f"mean training time per run: float32 {secs['off']:.0f} s, bf16 {secs['bf16']:.0f} s"
          + ("" if native else " (emulated bf16: not a speed measurement)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/bf16-accuracy", help="run folders (unset by --smoke: a temporary one)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, help="threads per run (default: the cores split between the jobs)")
    parser.add_argument("--check", action="store_true", help="only compare the emulation with PyTorch's bf16 conv")
    parser.add_argument("--batch", type=int, default=128, help="batch of --check's training step")
    parser.add_argument("--epochs", type=int, help="epochs of the job (default: the default job's 15)")
    parser.add_argument("--tiny-data", action="store_true", help="the job on generated Fashion-MNIST files (20/class)")
    args = parse_args(parser, dict(seeds=[0], out=None, batch=8, epochs=1, tiny_data=True, threads=1))
    native = native_bf16_cpu()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"(oneDNN): {native}; bf16 convolutions {'native' if native else 'emulated (fp32 accumulation)'}")
    if args.check or args.smoke:
        check_emulation(args.batch)
    if args.check:
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)  # the cores split between concurrent runs
    cells = [(amp, s) for s in args.seeds for amp in ("off", "bf16")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        overrides = (f"epochs={args.epochs}",) if args.epochs else ()
        if args.tiny_data:  # 20 images per class: at the default imbalance (100) the tail class would be empty
            overrides += (f"data_root={tiny_fashion_mnist(Path(tmp) / 'data')}", "imbalance=10")
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run, *zip(*[(a, s, out, threads, not native, overrides) for a, s in cells])))
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(rows, args.seeds, native)


if __name__ == "__main__":
    main()
