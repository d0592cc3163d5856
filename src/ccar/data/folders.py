"""Your own images in class folders (torchvision's ``ImageFolder`` layout): ``dataset=folder data_root=DIR``.

Two layouts:

- ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``;
- a single ``DIR/<class>/*`` tree, from which a seeded, stratified test split is carved (``test_fraction``,
  default 0.2; every class keeps at least one test and one training image, so a class needs two images).

Class names are the folder names (sorted); the long tail is whatever the folders hold. Files are found
recursively under each class folder; hidden files and non-image extensions are skipped. A symlink (file or folder)
that resolves outside ``DIR`` is refused. Sets that fit in memory (``in_memory=auto``: at most
:data:`IN_MEMORY_BYTES` of decoded pixels) are decoded once -- shorter side resized to ``image_size``, centre crop
-- into a uint8 cache (``~/.cache/ccar/folders``, keyed by every file's path, size and modification time, so a
changed file invalidates it) and train on the device-resident fast path; larger ones stream through the file loader.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..errors import DataError
from .profiles import stratified_split

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IN_MEMORY_BYTES = 2 << 30
CACHE_VERSION = 1


def _inside(path: Path, root: Path, what: str) -> Path:
    real = path.resolve()
    if not real.is_relative_to(root):
        raise DataError(f"folder: {what} {path} is a symlink that leaves the data root {root}; refused")
    return real


def scan_class_folders(root: Path) -> Tuple[List[Path], np.ndarray, List[str]]:
    """Image paths, label ids and class names of ``root/<class>/...``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder: {root} is not a folder")
    real_root = root.resolve()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"folder: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for c, name in enumerate(classes):
        folder = root / name
        _inside(folder, real_root, "class folder")
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:  # a linked sub-folder is not followed; one that leaves the root is an error
                if (Path(dirpath) / d).is_symlink():
                    _inside(Path(dirpath) / d, real_root, "folder")
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if f.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                if p.is_symlink():
                    _inside(p, real_root, "file")
                found.append(p)
        if not found:
            raise DataError(f"folder: class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        paths += found
        labels += [c] * len(found)
    return paths, np.asarray(labels, dtype=np.int64), classes


def folder_splits(root: Path, test_fraction: float = 0.2, seed: int = 0):
    """((train paths, labels), (test paths, labels), class names, layout description)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_paths, train_y, names = scan_class_folders(root / "train")
        test_paths, test_y, test_names = scan_class_folders(root / "test")
        unknown = sorted(set(test_names) - set(names))
        if unknown:
            raise DataError(f"folder: {root / 'test'} has class {unknown[0]!r} that {root / 'train'} does not have")
        remap = np.asarray([names.index(n) for n in test_names], dtype=np.int64)
        return (train_paths, train_y), (test_paths, remap[test_y]), names, "train/ and test/ folders"
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    paths, labels, names = scan_class_folders(root)
    counts = np.bincount(labels, minlength=len(names))
    single = [names[c] for c in range(len(names)) if counts[c] < 2]
    if single:
        raise DataError(f"folder: class {single[0]!r} has {counts[names.index(single[0])]} image; a test split is "
                        f"carved from one tree, so every class needs at least 2 (or use {root}/train and {root}/test)")
    train_pos, test_pos = stratified_split(labels, test_fraction, seed=10_000 + seed)
    layout = f"one tree, test split carved per class ({test_fraction:g}, seeded)"
    return ([paths[i] for i in train_pos], labels[train_pos]), ([paths[i] for i in test_pos], labels[test_pos]), names, layout


def load_image(path: Path, mode: str = "RGB"):
    """An image file decoded by Pillow and converted to ``mode``; any decode error -- and an image above Pillow's
    pixel limit, whose warning is raised as an error here -- is a :class:`DataError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; a training image that large is refused too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError, struct.error) as exc:  # what Pillow's decoders raise on damaged files (found by fuzzing)
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def resize_center_crop(im, size: int, short: Optional[int] = None):
    """Shorter side resized to ``short`` (default ``size``), then the centre ``size`` x ``size`` crop."""
    from PIL import Image

    w, h = im.size
    scale = (short or size) / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """One image as uint8 (channels, size, size): shorter side resized to ``size``, centre crop; errors name it."""
    array = np.asarray(resize_center_crop(load_image(path, "RGB" if channels == 3 else "L"), size), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _cache_dir() -> Path:
    from .downloads import cache_dir

    return cache_dir() / "folders"


def decode_all(paths: List[Path], size: int, what: str, progress: bool = True) -> np.ndarray:
    """All ``paths`` decoded into one uint8 (N, 3, size, size) array, through the cache."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{h.hexdigest()[:32]}.npy"
    if cache.is_file():
        try:
            images = np.load(cache, allow_pickle=False)
            if images.shape == (len(paths), 3, size, size) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    from tqdm.auto import tqdm

    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=f"decoding {what}", unit="img", leave=False, disable=not progress or None)):
        images[i] = decode_image(p, size)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, images, allow_pickle=False)
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs the decode next time
    return images


def fits_in_memory(n_images: int, size: int, setting: str) -> bool:
    """``in_memory``: ``true``, ``false`` or ``auto`` (decoded pixels at most :data:`IN_MEMORY_BYTES`)."""
    if setting not in ("auto", "true", "false"):
        raise DataError(f"in_memory must be auto, true or false, got {setting!r}")
    if setting != "auto":
        return setting == "true"
    return n_images * 3 * size * size <= IN_MEMORY_BYTES
