"""The engine end to end with the NCHW and the channels-last memory layout, side by side (``channels_last=auto``).

Runs ``ccar train`` (the engine, not a bare loop) on the default job's data and model for a few epochs, the two
layouts alternating, and prints the training throughput each run logged (images/s, median over its epochs) and
the whole run's wall time. The default ``channels_last=auto`` picks the channels-last layout for convolutional models.

    python benchmarks/channels_last.py [--epochs 2] [--rounds 2] [--model cnn] [--threads 2] [--data-root DIR] [--smoke]

``--smoke``: one round of one epoch on generated Fashion-MNIST files (20 images per class, imbalance 10), in
seconds, to check that the script works.
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
from ccar.engine.train import train
from _smoke import parse_args, tiny_fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dataset", default="fashion-mnist-lt")
    parser.add_argument("--data-root", help="data_root= of the runs (default: where ccar finds the dataset)")
    parser.add_argument("--imbalance", type=float, help="imbalance= of the runs (default: the dataset's)")
    parser.add_argument("--tiny-data", action="store_true", help="generated Fashion-MNIST files, 20 images per class")
    args = parse_args(parser, dict(epochs=1, rounds=1, threads=1, imbalance=10, tiny_data=True))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ccar train dataset={args.dataset} "
          f"model.name={args.model} epochs={args.epochs}, {args.rounds} rounds, layouts alternating")
    results = {"false": [], "true": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_fashion_mnist(Path(tmp) / "data") if args.tiny_data else args.data_root
        data = [f"data_root={root}"] if root else []
        data += [f"imbalance={args.imbalance:g}"] if args.imbalance else []
        for r in range(args.rounds):
            for layout in ("false", "true"):
                out = Path(tmp) / f"{layout}-{r}"
                cfg = load_config(None, [f"dataset={args.dataset}", f"model.name={args.model}", f"epochs={args.epochs}",
                                         f"channels_last={layout}", f"out={out}", "progress=false",
                                         f"threads={args.threads}", *data])
                start = time.perf_counter()
                train(cfg, log=lambda *_: None)
                wall = time.perf_counter() - start
                log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                ips = statistics.median(h["images_per_s"] for h in log)
                results[layout].append((ips, wall))
                print(f"  round {r + 1} channels_last={layout:5s}: {ips:7,.0f} img/s training, {wall:6.1f} s whole run")
    nchw = statistics.median(i for i, _ in results["false"])
    cl = statistics.median(i for i, _ in results["true"])
    wall_nchw = statistics.median(w for _, w in results["false"])
    wall_cl = statistics.median(w for _, w in results["true"])
    print(f"median: NCHW {nchw:,.0f} img/s, channels-last {cl:,.0f} img/s -> {cl / nchw:.2f}x training throughput; "
          f"whole run {wall_nchw:.1f} s vs {wall_cl:.1f} s -> {wall_nchw / wall_cl:.2f}x")


if __name__ == "__main__":
    main()
