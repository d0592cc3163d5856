"""Your own tables and feature files: CSV through pandas, and (X, y) feature files from any backbone.

**CSV** (``dataset=csv``: ``train.csv`` and ``test.csv`` in ``data_root``) is read with pandas' C parser: quoting,
encodings, type inference and missing values handled by a well-kept reader (measured against the former
hand-written reader in docs/benchmarks.md). The preprocessing is *fitted on the training file* and saved with the
run (``preprocessing.json``), so ``ccar eval`` and ``ccar predict`` apply exactly the same transformation:

- the label column is ``label_column``, else one named ``label``/``target``/``class``, else the last column;
  labels are mapped to ids in sorted order (numbers numerically);
- numeric columns stay numbers; any other column is categorical and one-hot encoded over the training file's
  categories (a category the training file never had becomes an all-zero row);
- a missing value is an error naming the column and the line, unless ``impute="mean"``: numeric columns then take
  the training mean, categorical ones the most frequent training category;
- standardisation (mean/std of every resulting feature over the training split) happens on the device, as for
  every dataset (:func:`ccar.data.normalize`).

**Feature files** (``dataset=features``): ``train`` and ``test`` as ``.npz`` (arrays ``X`` and ``y``),
``.safetensors`` (tensors ``X`` and ``y``) or ``train_X.npy`` + ``train_y.npy``. Loaded with ``allow_pickle=False``:
object arrays are refused. Labels may be integers (class ids) or strings (names, sorted).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

IMPUTE = ("none", "mean")
MAX_TABLE_BYTES = 4 << 30


def label_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def label_ids(labels, names: Sequence[str], where: str) -> np.ndarray:
    """int64 ids of ``labels`` in ``names``; a label not among them is a :class:`DataError` naming it."""
    import pandas as pd

    codes = pd.Index(list(names)).get_indexer(np.asarray(labels)).astype(np.int64)  # -1: not among the names
    if (codes < 0).any():
        unknown = sorted(set(np.asarray(labels)[codes < 0].tolist()))
        raise DataError(f"{where} has label {unknown[0]!r} that the training split does not have")
    return codes


def read_frame(path: Path):
    """A CSV file as a pandas DataFrame (header row required); unreadable files are a :class:`DataError`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV: file not found: {path}")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise DataError(f"CSV: {path} is larger than {MAX_TABLE_BYTES >> 30} GiB")
    try:
        frame = pd.read_csv(path, skip_blank_lines=True, encoding="utf-8-sig", low_memory=False)
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"CSV: {path} is empty; it needs a header row and at least one data row") from exc
    except (pd.errors.ParserError, ValueError, OverflowError, MemoryError) as exc:
        raise DataError(f"CSV: {path} is malformed: {str(exc).splitlines()[0][:200]}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame) == 0:
        raise DataError(f"CSV: {path} needs a header row and at least one data row")
    if len(set(frame.columns)) != len(frame.columns):
        raise DataError(f"CSV: {path} has duplicate column names")
    return frame


@dataclass
class TabularPreprocessing:
    """What ``fit`` learned from the training file; ``transform`` applies it to any file with the same columns."""

    label_column: str
    numeric: List[str]
    categorical: Dict[str, List[str]]  # column -> training categories (one-hot order)
    fill: Dict[str, object] = field(default_factory=dict)  # column -> imputed value (impute="mean")
    class_names: List[str] = field(default_factory=list)
    impute: str = "none"
    columns: List[str] = field(default_factory=list)  # feature columns in file order

    @classmethod
    def fit(cls, frame, path: Path, label_column: Optional[str] = None, impute: str = "none") -> "TabularPreprocessing":
        if impute not in IMPUTE:
            raise DataError(f"csv_impute must be one of {', '.join(IMPUTE)}, got {impute!r}")
        header = list(frame.columns)
        if label_column is None:
            label_column = next((h for h in header if h.lower() in ("label", "target", "class")), header[-1])
        if label_column not in header:
            raise DataError(f"CSV: {path} has no column {label_column!r}; columns: {', '.join(header)}")
        features = [h for h in header if h != label_column]
        if not features:
            raise DataError(f"CSV: {path} needs at least one feature column besides {label_column!r}")
        numeric = [c for c in features if _is_numeric(frame[c])]
        categorical = {}
        fill: Dict[str, object] = {}
        for c in features:
            if c in numeric:
                values = frame[c].astype(np.float64)
                if impute == "mean" and values.isna().any():
                    fill[c] = float(values.mean()) if values.notna().any() else 0.0
            else:
                text = frame[c].astype("string").str.strip()
                cats = sorted(set(text.dropna().tolist()), key=label_sort_key)
                categorical[c] = cats
                if impute == "mean" and text.isna().any():
                    fill[c] = text.mode().iloc[0] if text.notna().any() else ""
        labels = _labels(frame, label_column, path)
        names = sorted(set(labels), key=label_sort_key)
        return cls(label_column, numeric, categorical, fill, names, impute, features)

    @property
    def feature_names(self) -> List[str]:
        out = []
        for c in self.columns:
            out += [c] if c in self.numeric else [f"{c}={v}" for v in self.categorical[c]]
        return out

    def transform(self, frame, path: Path, with_labels: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Features float32 (N, F) and, if ``with_labels``, label ids int64 (N,)."""
        import pandas as pd

        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise DataError(f"CSV: {path} lacks the column {missing[0]!r} that the training file has")
        blocks = []
        for c in self.columns:
            col = frame[c]
            if c in self.numeric:
                if not _is_numeric(col):
                    bad = _first_non_numeric(col)
                    raise DataError(f"CSV: {path} column {c!r} line {bad[0]}: {bad[1]!r} is not a number")
                values = col.astype(np.float64).to_numpy()
                holes = np.isnan(values)
                if holes.any():
                    if c not in self.fill:
                        raise DataError(f"CSV: {path} column {c!r} has a missing value at line "
                                        f"{int(np.argmax(holes)) + 2}; fill it in or set csv_impute=mean")
                    values = np.where(holes, self.fill[c], values)
                if not np.isfinite(values).all():
                    raise DataError(f"CSV: {path} column {c!r} holds NaN or infinite values")
                blocks.append(values[:, None])
            else:
                text = col.astype("string").str.strip()
                if text.isna().any():
                    if c not in self.fill:
                        raise DataError(f"CSV: {path} column {c!r} has a missing value at line "
                                        f"{int(np.argmax(text.isna().to_numpy())) + 2}; fill it in or set csv_impute=mean")
                    text = text.fillna(self.fill[c])
                cats = self.categorical[c]
                codes = pd.Index(cats).get_indexer(text.to_numpy())  # -1: a category training never had
                onehot = np.zeros((len(codes), len(cats)), dtype=np.float64)
                known = codes >= 0
                onehot[np.nonzero(known)[0], codes[known]] = 1.0  # unseen categories stay all-zero
                blocks.append(onehot)
        x = np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((len(frame), 0), np.float32)
        if not with_labels:
            return x, None
        return x, label_ids(_labels(frame, self.label_column, path), self.class_names, f"CSV: {path}")

    def save(self, path: Path, mean: Sequence[float], std: Sequence[float]) -> None:
        path.write_text(json.dumps({**asdict(self), "mean": list(mean), "std": list(std)}, indent=1))

    @classmethod
    def load(cls, path: Path) -> Tuple["TabularPreprocessing", list, list]:
        data = json.loads(Path(path).read_text())
        mean, std = data.pop("mean"), data.pop("std")
        return cls(**data), mean, std


def _is_numeric(col) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col))


def _first_non_numeric(col) -> Tuple[int, str]:
    import pandas as pd

    converted = pd.to_numeric(col, errors="coerce")
    bad = converted.isna() & col.notna()
    i = int(np.argmax(bad.to_numpy())) if bad.any() else 0
    return i + 2, str(col.iloc[i])


def _labels(frame, label_column: str, path: Path) -> np.ndarray:
    col = frame[label_column]
    if col.isna().any():
        raise DataError(f"CSV: {path} label column {label_column!r} is empty at line {int(np.argmax(col.isna().to_numpy())) + 2}")
    if col.dtype.kind == "f" and (col % 1 == 0).all():
        col = col.astype(np.int64)  # "3.0" and "3" are the same class
    return col.astype(str).str.strip().to_numpy()


def read_csv(path: Path, label_column: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
             impute: str = "none"):
    """Features float32 (N, F), int64 labels and class names of one CSV file, preprocessing fitted on itself
    (``class_names``, e.g. the training file's, fixes the label ids).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("size,colour,label\\n1.5,red,cat\\n2.0,blue,dog\\n")
    >>> x, y, names = read_csv(path)
    >>> x.tolist(), y.tolist(), names  # size, colour=blue, colour=red
    ([[1.5, 0.0, 1.0], [2.0, 1.0, 0.0]], [0, 1], ['cat', 'dog'])
    """
    frame = read_frame(Path(path))
    prep = TabularPreprocessing.fit(frame, Path(path), label_column, impute)
    if class_names is not None:
        prep.class_names = list(class_names)
    x, y = prep.transform(frame, Path(path))
    return x, y, prep.class_names


# --- feature files ------------------------------------------------------------------------------------------------

_X_KEYS, _Y_KEYS = ("X", "x", "features"), ("y", "labels", "targets")


def _pick(arrays: Dict[str, np.ndarray], keys, what: str, path: Path) -> np.ndarray:
    for k in keys:
        if k in arrays:
            return arrays[k]
    raise DataError(f"features: {path} has no {what} array (named {' or '.join(keys)}); it holds {', '.join(arrays) or 'nothing'}")


def _load_arrays(path: Path, what: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The arrays of one .npz / .safetensors / .npy file (a .npy is ``X``), never unpickling anything."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        if path.suffix == ".npy":
            return {"X": np.load(path, allow_pickle=False)}
    except Exception as exc:  # zip/format errors, object arrays refused by allow_pickle=False, bad headers
        raise DataError(f"features: cannot read {what or path} ({type(exc).__name__}: {exc})") from exc
    raise DataError(f"features: {path} is not a .npz, .safetensors or .npy file")


def _features(arrays: Dict[str, np.ndarray], path: Path) -> np.ndarray:
    x = _pick(arrays, _X_KEYS, "feature", path)
    if x.ndim != 2 or x.dtype.kind not in "biuf":
        raise DataError(f"features: {path} X must be a 2-D numeric array (N, F), found {x.dtype} {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"features: {path} X holds NaN or infinite values")
    return x


def read_feature_file(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray, Path]:
    """(X float32 (N, F), y as stored, the file) of ``split`` in ``root``: .npz, .safetensors or _X/_y .npy."""
    root = Path(root)
    nx, ny = root / f"{split}_X.npy", root / f"{split}_y.npy"
    path = next((p for p in (root / f"{split}.npz", root / f"{split}.safetensors") if p.is_file()), None)
    what = f"the {split} file in {root}"
    if path is not None:
        arrays = _load_arrays(path, what)
    elif nx.is_file() and ny.is_file():
        path, arrays = nx, {"X": _load_arrays(nx, what)["X"], "y": _load_arrays(ny, what)["X"]}
    else:
        raise DataError(f"features: no {split}.npz, {split}.safetensors or {split}_X.npy + {split}_y.npy in {root}")
    x, y = _features(arrays, path), _pick(arrays, _Y_KEYS, "label", path)
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iuU":
        raise DataError(f"features: {path} y must be {len(x)} integer or string labels, found {y.dtype} {y.shape}")
    return x, y, path


def read_feature_rows(path: Path) -> np.ndarray:
    """X float32 (N, F) of one feature file for prediction: a .npz/.safetensors holding ``X`` (labels optional) or
    a 2-D .npy array."""
    path = Path(path)
    return _features(_load_arrays(path), path)


def feature_labels(y_train: np.ndarray, y_test: np.ndarray, test_path: Path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Label ids and class names: integer labels are class ids; string labels are names, sorted."""
    if y_train.dtype.kind in "iu":
        if y_test.dtype.kind not in "iu":
            raise DataError(f"features: {test_path} has string labels, the training file integer ones")
        if y_train.min() < 0 or y_test.min() < 0:
            raise DataError("features: integer labels must be >= 0")
        num = int(max(y_train.max(), y_test.max())) + 1
        return y_train.astype(np.int64), y_test.astype(np.int64), [str(i) for i in range(num)]
    names = sorted(set(y_train.tolist()), key=label_sort_key)
    return (label_ids(y_train, names, "features: the training file"),
            label_ids(y_test.astype(str), names, f"features: {test_path}"), names)
