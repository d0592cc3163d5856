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
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


# What Pillow raises on damaged files (its UnidentifiedImageError is an OSError) -- the set fuzzing found.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError,
              struct.error)


def load_image(path: Path, mode: str = "RGB"):
    """An image file decoded by Pillow and converted to ``mode``; any decode error -- and an image above Pillow's
    pixel limit, whose warning is raised as an error here -- is a :class:`DataError` naming the file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; a training image that large is refused too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    except PIL_ERRORS as exc:
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


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
SURVEY_SAMPLE = 512  # image headers read to choose image_size=auto (seeded sample of the training files)
MAX_NATIVE = 256  # a set of one size up to this trains at its native size
MAX_AUTO = 224  # otherwise the median shorter side, capped here
# Colour images larger than this train at this size: on every colour folder of docs/benchmarks.md (32-224 px,
# 1k-21k images) the compact CNN at 32 px reached the best balanced accuracy per CPU-minute, 8-10 points ahead of
# 48 px and far ahead of 64 px and of the native size.
COLOUR_AUTO = 32


@dataclass
class ImageSurvey:
    """What the headers of (a sample of) a folder's images say: their sizes and whether all are grey."""

    sizes: List[Tuple[int, int]]
    grey: bool

    def choose_size(self) -> Tuple[int, str]:
        """(image_size, why) for ``image_size=auto``: the native size when the images share one size up to
        :data:`MAX_NATIVE` px, else the median shorter side capped at :data:`MAX_AUTO` (never below 8); colour
        images larger than :data:`COLOUR_AUTO` px train at that size (grey ones keep theirs).

        >>> ImageSurvey([(28, 28)] * 3, True).choose_size()
        (28, 'the images share one size, 28x28')
        >>> ImageSurvey([(640, 480), (500, 375), (300, 400)], True).choose_size()
        (224, 'median shorter side 375 px, capped at 224')
        >>> ImageSurvey([(96, 96)] * 3, False).choose_size()[0], ImageSurvey([(24, 24)] * 3, False).choose_size()[0]
        (32, 24)
        """
        size, why = self._native_size()
        if not self.grey and size > COLOUR_AUTO:
            return COLOUR_AUTO, (f"{why}; colour images train at {COLOUR_AUTO} px, where the compact CNN learned the "
                                 f"most per CPU-minute on colour folders (docs/benchmarks.md)")
        return size, why

    def _native_size(self) -> Tuple[int, str]:
        shorter = sorted(min(w, h) for w, h in self.sizes)
        if len(set(self.sizes)) == 1 and max(self.sizes[0]) <= MAX_NATIVE:
            w, h = self.sizes[0]
            return max(8, min(w, h)), f"the images share one size, {w}x{h}"
        median = shorter[len(shorter) // 2]
        if median > MAX_AUTO:
            return MAX_AUTO, f"median shorter side {median} px, capped at {MAX_AUTO}"
        return max(8, median), f"median shorter side {median} px"


def survey_images(paths: Sequence[Path], seed: int = 0, sample: int = SURVEY_SAMPLE) -> ImageSurvey:
    """Read the headers (not the pixels) of up to ``sample`` of ``paths``, chosen with ``seed``."""
    from PIL import Image

    paths = list(paths)
    if len(paths) > sample:
        paths = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), sample, replace=False))]
    sizes, grey = [], True
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
                grey = grey and im.mode in GREY_MODES
        except (Image.DecompressionBombError,) + PIL_ERRORS as exc:  # the same set as load_image
            raise DataError(f"cannot decode image {p}: {type(exc).__name__}: {exc}") from exc
    return ImageSurvey(sizes, grey)


def decode_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """One image as uint8 (channels, size, size): shorter side resized to ``size``, centre crop; errors name it."""
    array = np.asarray(resize_center_crop(load_image(path, "RGB" if channels == 3 else "L"), size), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _cache_dir() -> Path:
    from .downloads import cache_dir

    return cache_dir() / "folders"


def decode_all(paths: List[Path], size: int, what: str, progress: bool = True, channels: int = 3) -> np.ndarray:
    """All ``paths`` decoded into one uint8 (N, channels, size, size) array, through the cache."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode() + (f":{channels}".encode() if channels != 3 else b""))
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = _cache_dir() / f"{h.hexdigest()[:32]}.npy"
    if cache.is_file():
        try:
            images = np.load(cache, allow_pickle=False)
            if images.shape == (len(paths), channels, size, size) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    from tqdm.auto import tqdm

    images = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=f"decoding {what}", unit="img", leave=False, disable=not progress or None)):
        images[i] = decode_image(p, size, channels)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, images, allow_pickle=False)
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs the decode next time
    return images


def fits_in_memory(n_images: int, size: int, setting: str, channels: int = 3) -> bool:
    """``in_memory``: ``true``, ``false`` or ``auto`` (decoded pixels at most :data:`IN_MEMORY_BYTES`)."""
    if setting not in ("auto", "true", "false"):
        raise DataError(f"in_memory must be auto, true or false, got {setting!r}")
    if setting != "auto":
        return setting == "true"
    return n_images * channels * size * size <= IN_MEMORY_BYTES
