"""Readers for the real on-disk formats. Each returns plain arrays and raises :class:`DataError` naming the file.

- IDX (MNIST, Fashion-MNIST), gzipped or raw;
- CIFAR-10/100 python pickles, through :mod:`.safe_pickle` (no code runs; only plain numeric arrays are built);
- image list files (ImageNet-LT, Places-LT) and iNaturalist-2018 JSON -> (relative path, label) records.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import pickle
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ..errors import DataError
from . import safe_pickle

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_FILE_BYTES = 2 << 30  # refuse absurd sizes before reading them into memory


def _read_bytes(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: file not found: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{what}: {path} is larger than {MAX_FILE_BYTES >> 20} MiB; refusing to load it into memory")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{what}: {path} is not a valid gzip file ({exc}); delete it and download it again") from exc
        if len(raw) > MAX_FILE_BYTES:
            raise DataError(f"{what}: {path} decompresses to more than {MAX_FILE_BYTES >> 20} MiB")
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``*-ubyte`` or ``*-ubyte.gz``) into an array of its declared shape and type."""
    raw = _read_bytes(path, "IDX")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"IDX: {path} has a wrong magic number {raw[:4].hex() or '(empty)'}; expected 0000 08 0N")
    ndim = raw[3]
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX: {path} declares {ndim} dimensions; the header is truncated or corrupt")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: an int64 product can overflow to 0
    payload = raw[4 + 4 * ndim :]
    if len(payload) != expected:
        raise DataError(
            f"IDX: {path} is truncated or corrupt: header shape {shape} needs {expected} bytes, found {len(payload)}"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))  # writable copy


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from a pair of IDX files, cross-checked."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"IDX: {images_path} should hold uint8 images (N, H, W), found {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"IDX: {labels_path} should hold labels (N,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"IDX: {images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    labels = labels.astype(np.int64)
    check_labels(labels, num_classes, labels_path)
    return images[:, None], labels


def check_labels(labels: np.ndarray, num_classes: int, where) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{where}: label {bad} is out of range for {num_classes} classes")


# --- CIFAR ------------------------------------------------------------------------------------------------------


def safe_unpickle(path: Path) -> dict:
    """Load a CIFAR python pickle with :mod:`ccar.data.safe_pickle`: no code runs, and numpy arrays are built only
    as plain numeric arrays from checked shapes and buffers. Anything else is a :class:`DataError` naming the file."""
    raw = _read_bytes(path, "CIFAR")
    try:
        obj = safe_pickle.loads(raw)
    except pickle.UnpicklingError as exc:
        raise DataError(f"CIFAR: refusing {path}: {exc}") from exc
    except Exception as exc:  # truncated or garbage bytes surface as many exception types
        raise DataError(f"CIFAR: {path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if type(obj) is not dict:
        raise DataError(f"CIFAR: {path} should hold a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _int_labels(labels, path: Path, key: str) -> np.ndarray:
    """Labels as int64 from a flat list of ints (the CIFAR files) or a 1-D integer array; never a nested object.
    Values outside int64 are refused here; the class range is checked by the caller."""
    if type(labels) is list and all(type(v) is int for v in labels):
        try:
            return np.asarray(labels, dtype=np.int64)
        except OverflowError:
            raise DataError(f"CIFAR: {path} '{key}' holds an integer out of range") from None
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)  # a uint64 above 2**63 wraps negative: out of range for check_labels
    raise DataError(f"CIFAR: {path} '{key}' must be a flat list of integers, found {type(labels).__name__}")


def _cifar_arrays(path: Path, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"CIFAR: {path} lacks the 'data' or '{label_key}' entry; is it a CIFAR batch file?")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR: {path} 'data' must be a uint8 array (N, 3072), found {getattr(data, 'shape', type(data))}")
    labels = _int_labels(labels, path, label_key)
    if labels.shape != (len(data),):
        raise DataError(f"CIFAR: {path} has {len(data)} images but {labels.size} labels")
    check_labels(labels, num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def read_cifar(root: Path, name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """CIFAR-10/100 images (N, 3, 32, 32) uint8 and labels from ``root`` (the folder holding the extracted dir)."""
    folder, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
    base = Path(root) / folder
    if not base.is_dir():
        base = Path(root) if (Path(root) / train_files[0]).exists() else base
    if not base.is_dir():
        raise DataError(
            f"{name}: folder {Path(root) / folder} not found; download and verify the official archive with "
            f"`ccar download {name} --root {root}` (or extract it there yourself)"
        )
    parts = [_cifar_arrays(base / f, label_key, num_classes) for f in (train_files if split == "train" else test_files)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --- file lists ---------------------------------------------------------------------------------------------------


def safe_relative(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` after refusing absolute paths and ``..`` components that would escape ``root``."""
    if "\x00" in rel:
        raise DataError(f"{where}: path {rel!r} contains a NUL byte; refused")
    p = Path(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: absolute path {rel!r} refused; list files must hold paths relative to the root")
    full = (Path(root) / p).resolve()
    if not full.is_relative_to(Path(root).resolve()):
        raise DataError(f"{where}: path {rel!r} escapes the data root; refused")
    return full


def read_image_list(list_file: Path, root: Path) -> Tuple[List[Path], np.ndarray]:
    """ImageNet-LT / Places-LT list file: one ``relative/path.jpg label`` per line."""
    raw = _read_bytes(list_file, "list file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"list file: {list_file} is not UTF-8 text") from exc
    paths, labels = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"list file: {list_file} line {n}: expected 'relative/path.jpg label', got {line[:80]!r}")
        try:
            label = int(parts[1])
        except ValueError as exc:
            raise DataError(f"list file: {list_file} line {n}: label {parts[1][:20]!r} is not an integer") from exc
        if label < 0:
            raise DataError(f"list file: {list_file} line {n}: negative label {label}")
        paths.append(safe_relative(root, parts[0], f"list file {list_file} line {n}"))
        labels.append(label)
    if not paths:
        raise DataError(f"list file: {list_file} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def read_inat_json(json_file: Path, root: Path) -> Tuple[List[Path], np.ndarray, Dict[int, str]]:
    """iNaturalist-2018 annotation JSON (``images``, ``annotations``, ``categories``) -> paths, labels, names."""
    raw = _read_bytes(json_file, "iNat JSON")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"iNat JSON: {json_file} is not valid JSON ({exc})") from exc
    try:
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        pairs = [(int(a["image_id"]), int(a["category_id"])) for a in data["annotations"]]
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"iNat JSON: {json_file} lacks images/annotations with id, file_name, category_id ({exc!r})") from exc
    paths, labels = [], []
    for image_id, category in pairs:
        if image_id not in files:
            raise DataError(f"iNat JSON: {json_file}: annotation refers to unknown image id {image_id}")
        if category < 0:
            raise DataError(f"iNat JSON: {json_file}: negative category id {category}")
        paths.append(safe_relative(root, files[image_id], f"iNat JSON {json_file}"))
        labels.append(category)
    if not paths:
        raise DataError(f"iNat JSON: {json_file} has no annotated images")
    return paths, np.asarray(labels, dtype=np.int64), names
