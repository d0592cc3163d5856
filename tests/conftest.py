"""Generators of small files in every real on-disk format the library reads."""

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# Every property test draws the same examples on every run (no example database, no fresh randomness): the same
# commit always gives the same result. Long randomised campaigns live outside `make test` (`make fuzz`).
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.load_profile("deterministic")
# amp=auto is bf16 on CPUs with native bf16: the tests (and the processes they start) run float32 on every CPU, so a
# commit's results do not depend on the machine CI happens to get; test_engine checks the detection itself.
os.environ["CCAR_NATIVE_BF16"] = "0"


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_dataset(root: Path, n_per_class=(40,) * 10, test_per_class=6, size=8, seed=0, gz=True) -> Path:
    """An MNIST-like folder: class c's images have brightness ~ 22 * c, so a model can learn them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", list(n_per_class)), ("t10k", [test_per_class] * len(n_per_class))):
        labels = np.concatenate([np.full(n, c, np.uint8) for c, n in enumerate(per)])
        rng.shuffle(labels)
        images = (rng.integers(0, 12, (len(labels), size, size)) + labels[:, None, None] * 25).clip(0, 255)
        write_idx(root / f"{split}-images-idx3-ubyte", images.astype(np.uint8), gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz)
    return root


def make_cifar(root: Path, name="cifar10", per_class=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n_per):
        labels = np.repeat(np.arange(classes), n_per)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return {b"data": data, key.encode(): labels.tolist(), b"batch_label": b"x"}

    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    for f in files:
        (folder / f).write_bytes(pickle.dumps(batch(per_class), protocol=2))
    (folder / ("test_batch" if name == "cifar10" else "test")).write_bytes(pickle.dumps(batch(2), protocol=2))
    return root


def make_image_tree(root: Path, counts=(6, 3, 1), size=12):
    """Tiny JPEGs plus ImageNet-LT-style list files and iNat-2018-style JSON files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines, images, annotations = [], [], []
    for c, n in enumerate(counts):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rel = f"train/c{c}/{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(root / rel)
            lines.append(f"{rel} {c}")
            images.append({"id": len(images), "file_name": rel})
            annotations.append({"image_id": len(annotations), "category_id": c})
    for split in ("train", "val", "test"):
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    doc = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"s{c}"} for c in range(len(counts))]}
    (root / "train2018.json").write_text(json.dumps(doc))
    (root / "val2018.json").write_text(json.dumps(doc))
    return root


def make_csv(root: Path, counts=(40, 12, 4), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = ["cat", "dog", "emu"]
    for split, per in (("train", counts), ("test", (5,) * len(counts))):
        rows = ["f1,f2,f3,label"]
        for c, n in enumerate(per):
            for _ in range(n):
                f = rng.normal(c * 2.0, 0.5, 3)
                rows.append(",".join(f"{v:.4f}" for v in f) + f",{names[c]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


FUZZ_COUNTS: dict = {}  # parser -> number of generated inputs tried in this session


def pytest_terminal_summary(terminalreporter):
    if FUZZ_COUNTS:
        tried = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_COUNTS.items()))
        terminalreporter.write_line(f"fuzzing: generated inputs tried per parser (only ccar's own errors escaped): {tried}")


@pytest.fixture
def idx_root(tmp_path):
    return make_idx_dataset(tmp_path / "idx")


@pytest.fixture
def csv_root(tmp_path):
    return make_csv(tmp_path / "csv")
