"""What every benchmark's ``--smoke`` mode shares (a helper, not a benchmark: tests/test_benchmarks.py skips files
whose name starts with ``_``).

``--smoke`` runs a benchmark's own code path end to end at toy sizes on the CPU, in seconds, so that the test suite
can run every script and a benchmark cannot stop working unnoticed. Its numbers measure nothing.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"  # by path, so that a benchmark runs from any working directory


def parse_args(parser: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """Parse with a ``--smoke`` flag whose sizes (``smoke``: dest -> value) replace the defaults; flags given on
    the command line still win, so ``--smoke --threads 2`` is a smoke run on two threads."""
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CPU run at toy sizes that checks the script works; measures nothing")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


def tiny_fashion_mnist(root: Path, per_class: int = 20, test_per_class: int = 4) -> str:
    """Fashion-MNIST's four IDX files with ``per_class`` generated 28x28 images per class (class c ~ brightness
    25 c), for ``data_root=``: the default job's code path without reading 60,000 real images. At ccar's default
    imbalance (100) the tail class would be empty; pass ``imbalance=10``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        rng.shuffle(labels)
        images = rng.integers(0, 20, (len(labels), 28, 28)) + 25 * labels[:, None, None]
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return str(root)
