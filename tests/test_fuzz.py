"""Hostile and fuzzed inputs for every reader of outside bytes, each parser in a child process.

A crash (segfault, abort) in a child fails the test that started it instead of killing pytest, and the inputs are
the same on every run: the stored regression corpus (tests/fuzz_corpus/) plus 1,000 inputs of campaign seed 0 per
parser. The long randomised campaign is `make fuzz` (tests/fuzzing.py).
"""

import subprocess
import sys

import numpy as np
import pytest

from conftest import FUZZ_COUNTS
from fuzzing import CORPUS, TARGETS, hostile_cifar_files, py2_cifar_batch, run_target

INPUTS_PER_PARSER = 1000


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_parser_in_a_child_process(target):
    s = run_target(target, seed=0, count=INPUTS_PER_PARSER, corpus=True, timeout=600)
    FUZZ_COUNTS[target] = s["inputs"]
    assert not s["crashes"], f"{target}: the parser process died: {s['crashes'][:3]}"
    assert not s["findings"], f"{target}: non-ccar exceptions escaped: {s['findings'][:3]}"
    assert s["inputs"] >= INPUTS_PER_PARSER and s["accepted"] + s["rejected"] == s["inputs"]


def test_the_corpus_holds_every_crafted_cifar_file():
    """Every crafted file is also a stored regression input (`tests/fuzzing.py --write-corpus` writes them)."""
    stored = {p.name for p in (CORPUS / "cifar").iterdir()}
    assert set(hostile_cifar_files()) <= stored


_CHILD = r"""
import sys, json
from pathlib import Path
from ccar.data.sources import _cifar_arrays
from ccar.errors import DataError
for path in sys.argv[1:]:
    print("start", Path(path).name, flush=True)
    try:
        x, y = _cifar_arrays(Path(path), "labels", 10)
        print("loaded", x.dtype, list(x.shape), y.tolist(), flush=True)
    except DataError as exc:
        print("refused", str(exc).replace("\n", " "), flush=True)
"""


def test_hostile_cifar_files_are_refused_and_the_process_survives(tmp_path):
    paths = []
    for name, blob in hostile_cifar_files().items():
        (tmp_path / name).write_bytes(blob)
        paths.append(tmp_path / name)
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"child died ({proc.returncode}) after {lines[-1:]}: {proc.stderr[-1500:]}"
    outcomes = dict(zip([ln.split(" ", 2)[1] for ln in lines[0::2]], lines[1::2]))
    assert len(outcomes) == len(paths)
    for name, outcome in outcomes.items():
        if name.startswith("valid-"):
            assert outcome.startswith("loaded uint8 [2, 3, 32, 32] [0, 1]"), (name, outcome)
        else:
            assert outcome.startswith("refused CIFAR:") and str(tmp_path) in outcome, (name, outcome)
    assert "object" in outcomes["object-dtype-data"] or "plain bool/integer/float" in outcomes["object-dtype-data"]


def test_py2_cifar_layout_loads_with_its_bytes(tmp_path):
    from ccar.data.sources import read_cifar

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(py2_cifar_batch(n=3, label_key=b"fine_labels"))
    x, y = read_cifar(tmp_path, "cifar100", "train")
    assert x.shape == (3, 3, 32, 32) and x.flags.writeable and y.tolist() == [0, 1, 2]
    assert np.array_equal(x.reshape(3, -1)[0, :256], np.arange(256, dtype=np.uint8))
