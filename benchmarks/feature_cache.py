"""The frozen-backbone fast path, measured as a user pays for it: a sweep of 10 head methods over one frozen
backbone (``finetune=linear``) with the cached features (the default: the backbone runs once, every method trains
its classifier on the features) against the same sweep with ``cache_features=false`` (every method passes every
batch through the backbone, every epoch and every evaluation). Both in this one run, one after the other.

    python benchmarks/feature_cache.py [--epochs 8] [--width 16] [--weights runs/pretrain/mnist/best.safetensors]
                                       [--methods CE LA ...] [--smoke]

Data: Fashion-MNIST-LT, imbalance 100 (13,397 training images). Backbone: the compact CNN (``--width``), from
``--weights`` when given (e.g. study 5's MNIST-pretrained backbone), else its random initialisation -- the timing is
the same either way. Prints each sweep's wall-clock seconds, the ratio, and each method's balanced test accuracy
both ways (they differ by the training-time augmentation that cached features do without).

``--smoke``: one method of each kind (a loss, a sampler, a post-hoc classifier), one epoch, generated Fashion-MNIST
files (20 images per class, imbalance 10): seconds on the CPU, to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from ccar.sweep import read_results, run_sweep
from _smoke import parse_args, tiny_fashion_mnist

METHODS = {
    "CE": {"loss.name": "ce"},
    "LA": {"loss.name": "la"},
    "BS": {"loss.name": "bs"},
    "Focal": {"loss.name": "focal"},
    "CB": {"loss.name": "cb"},
    "CCAR-CE": {"loss.name": "ccar", "loss.base": "ce"},
    "CCAR-LA": {"loss.name": "ccar", "loss.base": "la"},
    "CB-RS": {"loss.name": "ce", "sampler": "class-balanced"},
    "tau-norm": {"loss.name": "ce", "tau_norm": "auto"},
    "post-hoc LA": {"loss.name": "ce", "posthoc_tau": 1.0},
}


def sweep(folder: Path, cache: str, args, data_root=None) -> tuple:
    base = {"dataset": "fashion-mnist-lt", "imbalance": args.imbalance, "epochs": args.epochs, "amp": "off",
            "model": {"name": "cnn", "width": args.width}, "finetune": "linear", "cache_features": cache,
            "threads": args.threads}
    if data_root:
        base["data_root"] = data_root
    if args.weights:
        base["model"]["weights"] = args.weights
    methods = {m: METHODS[m] for m in args.methods}
    spec = {"out": str(folder / "sweep"), "jobs": 1, "seeds": [0], "base": base, "methods": methods,
            "report": {"metric": "balanced", "baselines": {}}}
    folder.mkdir(parents=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    start = time.perf_counter()
    run_sweep(str(path), log=lambda *_: None)
    seconds = time.perf_counter() - start
    rows = read_results(folder / "sweep" / "results.jsonl")
    return seconds, {r["method"]: r["metrics"]["balanced"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--imbalance", type=int, default=100)
    ap.add_argument("--tiny-data", action="store_true", help="generated Fashion-MNIST files (20/class)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                    help=f"head methods to sweep (default: all: {', '.join(METHODS)})")
    args = parse_args(ap, dict(epochs=1, width=4, threads=1, imbalance=10, tiny_data=True,
                               methods=["CCAR-LA", "CB-RS", "tau-norm"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_fashion_mnist(Path(tmp) / "data") if args.tiny_data else None
        cached_s, cached = sweep(Path(tmp) / "cached", "auto", args, root)
        through_s, through = sweep(Path(tmp) / "through", "false", args, root)
    data = "generated Fashion-MNIST files" if args.tiny_data else "Fashion-MNIST-LT"
    print(f"{len(args.methods)} head methods, finetune=linear, {data} IF {args.imbalance}, CNN width {args.width}, "
          f"{args.epochs} epochs, {args.threads} threads, backbone {args.weights or 'random init'}")
    print(f"  cached features (computed once): {cached_s:7.1f} s")
    print(f"  through the backbone every step: {through_s:7.1f} s")
    print(f"  speed-up: {through_s / cached_s:.1f}x")
    print("  balanced test accuracy (%), cached | through the backbone (augmented):")
    for m in args.methods:
        print(f"    {m:12s} {cached[m]:5.1f} | {through[m]:5.1f}")
    print(json.dumps({"cached_s": cached_s, "through_s": through_s, "ratio": through_s / cached_s,
                      "epochs": args.epochs, "width": args.width, "threads": args.threads}))


if __name__ == "__main__":
    main()
