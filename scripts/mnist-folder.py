"""Write real MNIST digits as a long-tailed folder of PNG files, the layout a user brings (``dataset=folder``):
OUT/train/<digit>/<n>.png with n_max ... n_max/imbalance images per class (LDAM-DRW's exponential profile and seeded
subset, as ``mnist-lt`` builds it) and OUT/test/<digit>/<n>.png with the whole balanced test set.

    sh scripts/get-mnist.sh && python scripts/mnist-folder.py runs/mnist-png [--n-max 1000] [--imbalance 100]
    ccar train dataset=folder data_root=runs/mnist-png loss.name=la
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ccar.data.datasets import load_source
from ccar.data.profiles import long_tail_counts, long_tail_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n-max", type=int, default=1000)
    parser.add_argument("--imbalance", type=float, default=100.0)
    parser.add_argument("--data-root", default=None, help="folder of the MNIST IDX files (default: ccar's cache)")
    args = parser.parse_args()
    out = Path(args.out)
    for split in ("train", "test"):
        x, y = load_source("mnist", args.data_root, split)
        keep = np.arange(len(y))
        if split == "train":
            keep = long_tail_indices(y, long_tail_counts(args.n_max, 10, args.imbalance))
        for i in keep:
            folder = out / split / str(int(y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0]).save(folder / f"{i}.png")
        print(f"{split}: {len(keep)} images, per class {np.bincount(y[keep], minlength=10).tolist()} -> {out / split}")


if __name__ == "__main__":
    main()
