"""The dataset catalog: names the configs use -> long-tailed train / val / test splits with class counts."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import DataError
from . import downloads as dl
from .profiles import long_tail_counts, long_tail_indices, stratified_split
from .class_names import names_file, read_class_names
from .folders import decode_all, fits_in_memory, folder_splits, survey_images
from .sources import read_cifar, read_idx_pair, read_image_list, read_inat_json
from .synthetic import GaussianLT, GaussianShape, balanced_accuracy, nearest_mean_predictions
from .tabular import TabularPreprocessing, feature_labels, read_csv, read_feature_file, read_frame

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Augment:
    """Batched augmentation applied on the device: random crop with zero padding, horizontal flip, normalise."""

    crop_padding: int = 0
    flip: bool = False
    mean: Tuple[float, ...] = (0.5,)
    std: Tuple[float, ...] = (0.5,)

    def describe(self, streamed: bool = False) -> str:
        """What runs on training batches, for the run summary."""
        if streamed:
            return "random-resized crop" + (" + horizontal flip" if self.flip else " (no flip)")
        crop = f"random crop (padding {self.crop_padding})" if self.crop_padding else "no crop"
        return crop + (" + horizontal flip" if self.flip else ", no flip")


@dataclass
class ImageFiles:
    """A file-backed split: image paths (already checked to lie under the root) and labels."""

    paths: List[Path]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


Split = Union[Tuple[torch.Tensor, torch.Tensor], ImageFiles]


@dataclass
class LongTailData:
    """Train / val / test splits. In-memory splits are (uint8 images N,C,H,W or float features N,F; int64 targets)."""

    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split
    class_counts: List[int]  # of the training split, after carving out validation
    class_names: List[str] = field(default_factory=list)
    augment: Augment = field(default_factory=Augment)
    input_shape: Tuple[int, ...] = ()
    kind: str = "image"  # "image" (in memory), "tabular" or "files"
    note: str = ""  # how the data was built, shown in the summary
    preprocessing: Optional[object] = None  # csv: the fitted TabularPreprocessing (saved with the run)
    reference: Dict[str, float] = field(default_factory=dict)  # known optima (gaussian-lt), copied into metrics

    @property
    def in_memory(self) -> bool:
        return self.kind != "files"

    @property
    def image_size(self) -> Optional[int]:
        """The side of the square images the model sees (None for tables and features)."""
        return int(self.input_shape[-1]) if len(self.input_shape) == 3 else None

    def summary(self) -> str:
        n_val = len(self.val[1]) if self.in_memory else len(self.val)
        n_test = len(self.test[1]) if self.in_memory else len(self.test)
        counts = self.class_counts
        shown = f"counts {counts}" if len(counts) <= 20 else f"counts {max(counts)}..{min(counts)}"
        augment = f"; augmentation: {self.augment.describe(not self.in_memory)}" if self.image_size else ""
        return (
            f"{self.name}: {sum(counts)} train / {n_val} val / {n_test} test, {self.num_classes} classes, "
            f"{shown} (imbalance {max(counts) / max(1, min(counts)):.0f})" + (f"; {self.note}" if self.note else "")
            + augment
        )


SYNTHETIC_LT = ("fashion-mnist-lt", "mnist-lt", "cifar10-lt", "cifar100-lt")
KNOWN_OPTIMUM = ("gaussian-lt",)  # synthetic too: imbalance and n_max apply
SOURCES = ("mnist", "fashion-mnist", "cifar10", "cifar100", "csv")

_STATS = {
    "mnist": ((0.1307,), (0.3081,), 10),
    "fashion-mnist": ((0.2860,), (0.3530,), 10),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _idx_root(name: str, root: Optional[str]) -> Path:
    """Where the IDX files are: explicit root, $CCAR_<NAME>, Debian's package (Fashion-MNIST), the cache, download."""
    env = "CCAR_" + name.upper().replace("-", "_")
    if root:  # an explicit folder is the only place looked in: a typo must not train on a cached copy instead
        candidates = [Path(root)]
    else:
        candidates = ([Path(os.environ[env])] if os.environ.get(env) else []) + (
            [DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else []) + [dl.cache_dir() / name]
    for c in candidates:
        if any((c / (f + ext)).is_file() for f in IDX_NAMES["train"][:1] for ext in (".gz", "")):
            return c
    if root:
        raise DataError(f"{name}: no IDX files ({IDX_NAMES['train'][0]}[.gz], ...) in data_root {root}")
    try:
        return dl.download_idx(name)
    except DataError as exc:
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise DataError(
            f"{name}: files not found locally and the download failed ({exc}). Put the four IDX files in a folder "
            f"and pass data_root=FOLDER (or set {env}){hint}"
        ) from exc


def _find(folder: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    raise DataError(f"IDX: {folder / stem}[.gz] not found")


@functools.lru_cache(maxsize=4)
def _cached_source(name: str, root: Optional[str], split: str) -> Tuple[np.ndarray, np.ndarray]:
    x, y = load_source(name, root, split)
    x.flags.writeable = False  # shared between runs of one process (sweeps): never modified in place
    y.flags.writeable = False
    return x, y


def load_source(name: str, root: Optional[str], split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Raw arrays of an in-memory source: images uint8 (N, C, H, W) or features float32 (N, F), targets int64.

    ``name`` in ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``csv``; ``split`` in ``train``, ``test``.
    For ``csv``, ``root`` is a folder with ``train.csv`` and ``test.csv``.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if name in ("mnist", "fashion-mnist"):
        folder = _idx_root(name, root)
        images, labels = IDX_NAMES[split]
        return read_idx_pair(_find(folder, images), _find(folder, labels))
    if name in ("cifar10", "cifar100"):
        if not root:
            root = str(dl.cache_dir() / name)
        return read_cifar(Path(root), name, split)
    if name == "csv":
        if not root:
            raise DataError("csv: data_root must name a folder holding train.csv and test.csv")
        x, y, _ = read_csv(Path(root) / f"{split}.csv")
        return x, y
    raise DataError(f"unknown source {name!r}; valid: {', '.join(SOURCES)}")


def _carve_val(x, y, val_fraction: float, seed: int):
    train_pos, val_pos = stratified_split(y, val_fraction, seed)
    return (x[train_pos], y[train_pos]), (x[val_pos], y[val_pos])


def _tensors(split) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = split
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _counts(y: np.ndarray, num_classes: int, where: str) -> List[int]:
    counts = np.bincount(y, minlength=num_classes).tolist()
    if len(counts) > num_classes:
        raise DataError(f"{where}: label {len(counts) - 1} is out of range for {num_classes} classes")
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise DataError(f"{where}: class {empty[0]} has no training samples left; lower the imbalance or val_fraction")
    return counts


@dataclass
class DataRequest:
    """Everything a dataset builder may use; each builder reads the fields that apply to it."""

    name: str
    data_root: Optional[str] = None
    imbalance: Optional[float] = None
    profile: str = "exp"
    val_fraction: float = 0.1
    seed: int = 0
    n_max: Optional[int] = None
    label_column: Optional[str] = None  # csv
    csv_impute: str = "none"  # csv: none | mean
    test_fraction: float = 0.2  # folder (one tree)
    image_size: Union[int, str] = "auto"  # folder, file lists: pixels, or auto (folders: from the images; lists: 224)
    in_memory: str = "auto"  # folder: auto | true | false
    channels: Optional[int] = None  # folder: 3 forces colour (a pretrained backbone needs it); None: from the images
    progress: bool = True
    classes: Optional[List[int]] = None  # synthetic long tails: these source classes only, relabelled 0..k-1
    gaussian: GaussianShape = field(default_factory=GaussianShape)  # gaussian-lt
    class_names: Optional[str] = None  # a names file (ccar.data.class_names); unset: classes.txt/.json in data_root

    @property
    def root(self) -> Path:
        if not self.data_root:
            raise DataError(f"{self.name}: data_root is required ({_ROOT_HELP.get(self.name, 'the data folder')})")
        root = Path(self.data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"{self.name}: data_root {root} is not a folder")
        return root


_ROOT_HELP = {
    "csv": "a folder holding train.csv and test.csv",
    "features": "a folder holding train/test .npz, .safetensors or _X/_y .npy files",
    "folder": "a folder of class folders, or with train/ and test/ holding class folders",
}
BUILDERS: Dict[str, Callable[[DataRequest], "LongTailData"]] = {}


def register_dataset(*names: str):
    """Register a builder ``fn(request) -> LongTailData`` under ``names`` (what configs say as ``dataset=``)."""
    def wrap(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn
    return wrap


def build_dataset(name: str, data_root: Optional[str] = None, imbalance: Optional[float] = None, profile: str = "exp",
                  val_fraction: float = 0.1, seed: int = 0, n_max: Optional[int] = None, **options) -> LongTailData:
    """Build dataset ``name`` (a key of :data:`BUILDERS`): long-tailed benchmarks exactly as the literature builds
    them (method.md section 3), natural long tails as they come, and your own data.

    Synthetic long tails (``fashion-mnist-lt``, ``mnist-lt``, ``cifar10-lt``, ``cifar100-lt``) subset the balanced
    training set with LDAM-DRW's procedure (``imbalance`` defaults to 100; the subset does not depend on ``seed``,
    as in the literature); the validation split is then carved, seeded by ``seed``, from that subset, and the test
    set stays balanced and untouched. The head count ``n_max`` defaults to the smallest class of the source, so
    that every class can supply its share: 6,000 for Fashion-MNIST, 5,000 / 500 for CIFAR-10/100 (balanced sources,
    as in the literature) and 5,421 for MNIST, whose training classes hold 5,421 to 6,742 images. An explicit
    ``n_max`` larger than some class can supply is an error naming the class. Natural long tails (``imagenet-lt``,
    ``places-lt``, ``inat2018``) and your own data (``csv``, ``features``, ``folder``) come as they are;
    ``imbalance`` and ``n_max`` are errors there. ``options``: the other fields of :class:`DataRequest`.
    """
    if name not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(BUILDERS)}")
    if name not in SYNTHETIC_LT + KNOWN_OPTIMUM:
        if imbalance is not None and imbalance != 1:
            raise DataError(f"{name} is a natural long tail; imbalance={imbalance} does not apply (leave it unset)")
        if n_max is not None:
            raise DataError(f"{name} is a natural long tail; n_max={n_max} does not apply (leave it unset)")
    if options.get("classes") is not None and name not in SYNTHETIC_LT:
        raise DataError(f"classes= picks classes of a synthetic long tail ({', '.join(SYNTHETIC_LT)}); "
                        f"{name} takes its classes as they come")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DataRequest)})
    if unknown:
        raise DataError(f"build_dataset: unknown option {unknown[0]!r}")
    request = DataRequest(name, data_root, imbalance, profile, val_fraction, seed, n_max, **options)
    names = names_file(name, data_root, request.class_names)  # (a missing file: an error before any work)
    data = check_classes(BUILDERS[name](request), data_root)
    if names is not None:
        data.class_names = read_class_names(names, data.class_names or [str(c) for c in range(data.num_classes)])
        data.note += f"{'; ' if data.note else ''}class names from {names}"
    return data


def check_classes(data: LongTailData, data_root: Optional[str] = None) -> LongTailData:
    """Every dataset, whatever its builder: at least two classes, each with at least one training sample (a
    one-class "classifier" would report 100 %; a class the model never sees cannot be learned or weighted)."""
    where = f" in {data_root}" if data_root else ""
    names = data.class_names or [str(c) for c in range(data.num_classes)]
    if data.num_classes < 2:
        raise DataError(f"{data.name}{where}: found {data.num_classes} class{'es' if data.num_classes != 1 else ''} "
                        f"({', '.join(names) or 'none'}); a classifier needs at least two")
    empty = [names[c] for c, n in enumerate(data.class_counts) if n == 0]
    if empty:
        shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{data.name}{where}: class{'es' if len(empty) > 1 else ''} {shown} "
                        f"{'have' if len(empty) > 1 else 'has'} no training samples (after carving the validation split)")
    return data


@register_dataset(*SYNTHETIC_LT)
def _build_synthetic(req: DataRequest) -> LongTailData:
    name, data_root, imbalance, profile, n_max = req.name, req.data_root, req.imbalance, req.profile, req.n_max
    source = name[:-3]
    mean, std, num_classes = _STATS[source]
    x, y = _cached_source(source, data_root, "train")
    xt, yt = _cached_source(source, data_root, "test")
    picked = ""
    if req.classes is not None:  # e.g. classes 0-4 upstream (pretraining), 5-9 downstream (a transfer study)
        x, y, xt, yt, num_classes = _keep_classes(name, req.classes, num_classes, x, y, xt, yt)
        picked = f"source classes {list(req.classes)} as 0..{num_classes - 1}; "
    available = np.bincount(y, minlength=num_classes)
    head = int(available.min()) if n_max is None else int(n_max)
    imbalance = 100.0 if imbalance is None else imbalance
    counts = long_tail_counts(head, num_classes, imbalance, profile)
    short = [c for c in range(num_classes) if counts[c] > available[c]]
    if short:
        c = short[0]
        raise DataError(f"{name}: class {c} has {available[c]} training images, fewer than the {counts[c]} that "
                        f"n_max={head} asks for; use n_max <= {int(available.min())} or leave it unset")
    keep = long_tail_indices(y, counts, seed=0)
    note = picked + (f"head n_max={head} ({'the smallest source class' if n_max is None else 'set by n_max'}; "
            f"source classes hold {int(available.min())}..{int(available.max())})")
    train, val = _carve_val(x[keep], y[keep], req.val_fraction, req.seed)
    test = (np.array(xt), np.array(yt))
    is_cifar = source.startswith("cifar")
    augment = Augment(crop_padding=4 if is_cifar else 2, flip=source != "mnist", mean=mean, std=std)
    return LongTailData(
        name, num_classes, _tensors(train), _tensors(val), _tensors(test),
        _counts(train[1], num_classes, name), [str(c) for c in (req.classes or range(num_classes))], augment,
        tuple(x.shape[1:]), "image", note,
    )


def _keep_classes(name, classes, num_classes, x, y, xt, yt):
    """The rows of ``classes`` (source labels, each once), relabelled 0..k-1 in the order given."""
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or len(set(classes)) != len(classes) or len(classes) < 2:
        raise DataError(f"{name}: classes must be 2 or more distinct source classes in 0..{num_classes - 1}; "
                        f"got {classes}")
    relabel = np.full(num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    keep, keep_t = relabel[y] >= 0, relabel[yt] >= 0
    return x[keep], relabel[y[keep]], xt[keep_t], relabel[yt[keep_t]], len(classes)


@register_dataset("gaussian-lt")
def _build_gaussian(req: DataRequest) -> LongTailData:
    spec = GaussianLT(**dataclasses.asdict(req.gaussian), imbalance=100.0 if req.imbalance is None else req.imbalance,
                      n_max=req.n_max or 0)
    x, y, xt, yt = spec.sample()
    bayes = balanced_accuracy(nearest_mean_predictions(xt, spec.means()), yt, spec.num_classes)
    note = (f"synthetic: {spec.num_classes} Gaussian classes in {spec.dim} dimensions, separation {spec.separation:g}; "
            f"Bayes balanced accuracy on the test draws {bayes:.2f} %")
    data = _tabular("gaussian-lt", x, y, xt, yt, [str(c) for c in range(spec.num_classes)], req, "gaussian-lt",
                    note=note)
    data.reference = {"bayes_balanced_accuracy": bayes}
    return data


def _tabular(name, x, y, xt, yt, names, req, where, preprocessing=None, note="") -> LongTailData:
    if xt.shape[1] != x.shape[1]:
        raise DataError(f"{name}: the test split has {xt.shape[1]} features, the training split {x.shape[1]}")
    train, val = _carve_val(x, y, req.val_fraction, req.seed)
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6  # training statistics only
    aug = Augment(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    return LongTailData(
        name, len(names), _tensors(train), _tensors(val), _tensors((xt, yt)),
        _counts(train[1], len(names), where), names, aug, (x.shape[1],), "tabular", note, preprocessing,
    )


@register_dataset("csv")
def _build_csv(req: DataRequest) -> LongTailData:
    root = req.root
    train_file, test_file = root / "train.csv", root / "test.csv"
    frame = read_frame(train_file)
    prep = TabularPreprocessing.fit(frame, train_file, req.label_column, req.csv_impute)
    x, y = prep.transform(frame, train_file)
    xt, yt = prep.transform(read_frame(test_file), test_file)
    note = f"{len(prep.numeric)} numeric and {len(prep.categorical)} categorical columns -> {x.shape[1]} features"
    return _tabular("csv", x, y, xt, yt, prep.class_names, req, f"csv {train_file}", prep, note)


@register_dataset("features")
def _build_features(req: DataRequest) -> LongTailData:
    root = req.root
    x, y_raw, train_path = read_feature_file(root, "train")
    xt, yt_raw, test_path = read_feature_file(root, "test")
    y, yt, names = feature_labels(y_raw, yt_raw, test_path)
    return _tabular("features", x, y, xt, yt, names, req, f"features {train_path}", note=f"{x.shape[1]} features")


@register_dataset("folder")
def _build_folder(req: DataRequest) -> LongTailData:
    root = req.root
    (train_paths, train_y), (test_paths, test_y), names, layout = folder_splits(root, req.test_fraction, req.seed)
    train_pos, val_pos = stratified_split(train_y, req.val_fraction, req.seed)
    survey = survey_images(train_paths, req.seed)
    if req.image_size == "auto":
        size, why = survey.choose_size()
        note = f"{layout}; images {size}x{size} (image_size=auto: {why}; set image_size=N to change)"
    else:
        size = int(req.image_size)
        note = f"{layout}; images {size}x{size}"
    # Grey images (digits, scans, text) stay one channel and are not flipped; colour images are taken as photos.
    channels = req.channels or (1 if survey.grey else 3)
    if fits_in_memory(len(train_paths) + len(test_paths), size, req.in_memory, channels):
        images = decode_all(train_paths, size, "training images", req.progress, channels)
        test_images = decode_all(test_paths, size, "test images", req.progress, channels)
        train, val = (images[train_pos], train_y[train_pos]), (images[val_pos], train_y[val_pos])
        if channels == 1:  # the training images' own statistics (ImageNet's are for colour photos)
            pixels = train[0].reshape(-1).astype(np.float64) / 255
            mean, std = (float(pixels.mean()),), (float(max(pixels.std(), 1e-3)),)
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        augment = Augment(crop_padding=max(1, size // 8), flip=not survey.grey, mean=mean, std=std)
        return LongTailData("folder", len(names), _tensors(train), _tensors(val), _tensors((test_images, test_y)),
                            _counts(train[1], len(names), f"folder {root}"), names, augment, (channels, size, size),
                            "image", note + (", grey (1 channel)" if channels == 1 else "") + ", decoded in memory")
    train = ImageFiles([train_paths[i] for i in train_pos], train_y[train_pos])
    val = ImageFiles([train_paths[i] for i in val_pos], train_y[val_pos])
    test = ImageFiles(test_paths, test_y)
    augment = Augment(flip=not survey.grey, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return LongTailData("folder", len(names), train, val, test, _counts(train.targets, len(names), f"folder {root}"),
                        names, augment, (3, size, size), "files", note + ", streamed from the files")


_LISTS = {
    "imagenet-lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places-lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
}


@register_dataset("imagenet-lt", "places-lt", "inat2018")
def _build_files(req: DataRequest) -> LongTailData:
    name, root, val_fraction, seed = req.name, req.root, req.val_fraction, req.seed
    if name in _LISTS:
        train, val, test = (ImageFiles(*read_image_list(root / f, root)) for f in _LISTS[name])
        num_classes = int(max(s.targets.max() for s in (train, val, test))) + 1  # 1000 / 365 on the real lists
        names = [str(i) for i in range(num_classes)]
    else:  # inat2018: the official val set serves as the test set, validation is carved from train
        paths, labels, cat_names = read_inat_json(root / "train2018.json", root)
        test_paths, test_labels, _ = read_inat_json(root / "val2018.json", root)
        num_classes = int(max(labels.max(), test_labels.max())) + 1
        train_pos, val_pos = stratified_split(labels, val_fraction, seed)
        train = ImageFiles([paths[i] for i in train_pos], labels[train_pos])
        val = ImageFiles([paths[i] for i in val_pos], labels[val_pos])
        test = ImageFiles(test_paths, test_labels)
        names = [cat_names.get(i, str(i)) for i in range(num_classes)]
    aug = Augment(flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    counts = _counts(train.targets, num_classes, f"{name} train")
    size = 224 if req.image_size == "auto" else int(req.image_size)  # the standard for these benchmarks
    return LongTailData(name, num_classes, train, val, test, counts, names, aug, (3, size, size), "files")


DATASETS = tuple(BUILDERS)  # every name `dataset=` accepts, in registration order
