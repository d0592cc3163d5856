"""Reading a large CSV: ccar's pandas-based reader against the hand-written ``csv``-module reader it replaced.

Generates a table (default 1,000,000 rows: 10 numeric feature columns, a string label), then reads it with both,
alternating, and prints the median seconds and the ratio. The replaced reader is kept here, verbatim in behaviour
(``csv.reader`` + ``float()`` per cell), only to measure against. pandas was chosen over pyarrow and polars: its C
parser is a few times faster than the csv module, it is the reader most users already have, and it brings the
categorical and missing-value handling ccar needs (pyarrow's reader, not measured here, would add a second and larger
dependency).

    python benchmarks/csv_reader.py [--rows 1000000] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ccar.data.tabular import read_csv
from _smoke import parse_args


def handwritten_read_csv(path: Path):
    """The reader ccar used before pandas: csv.reader, one float() per cell, labels mapped in sorted order."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    header = [h.strip() for h in rows[0]]
    li = next((i for i, h in enumerate(header) if h.lower() in ("label", "target", "class")), len(header) - 1)
    features, labels = [], []
    for row in rows[1:]:
        features.append([float(v) for i, v in enumerate(row) if i != li])
        labels.append(row[li].strip())
    x = np.asarray(features, dtype=np.float32)
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    return x, np.asarray([index[v] for v in labels], dtype=np.int64), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parse_args(parser, dict(rows=2000, rounds=1))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.csv"
        x = rng.normal(size=(args.rows, 10)).round(5)
        labels = rng.choice(np.array(["head", "mid", "tail"]), size=args.rows, p=[0.8, 0.15, 0.05])
        with open(path, "w") as f:
            f.write(",".join(f"f{i}" for i in range(10)) + ",label\n")
            for row, label in zip(x, labels):
                f.write(",".join(map(str, row)) + "," + label + "\n")
        print(f"{args.rows:,} rows x 11 columns, {path.stat().st_size / 2**20:.0f} MiB")
        times = {"hand-written csv module": [], "pandas (ccar)": []}
        for _ in range(args.rounds):
            for name, fn in (("hand-written csv module", handwritten_read_csv), ("pandas (ccar)", read_csv)):
                start = time.perf_counter()
                xs, ys, _ = fn(path)
                times[name].append(time.perf_counter() - start)
                assert xs.shape == (args.rows, 10)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"  {k:24s} {v:6.2f} s (median of {args.rounds})")
        print(f"speed-up: {med['hand-written csv module'] / med['pandas (ccar)']:.1f}x")


if __name__ == "__main__":
    main()
