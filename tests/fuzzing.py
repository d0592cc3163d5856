"""Fuzzing every reader of outside bytes: seeded input generators, a worker process per parser, and a campaign.

Input ``i`` of parser ``T`` in a campaign with seed ``S`` is a pure function of (T, S, i), so any finding can be
regenerated from three numbers. A parser may accept an input or reject it with ccar's own exception
(``CCARError``); any other exception is a *finding*, and a process that dies (segfault, abort) is a *crash*.

- ``make test`` (``tests/test_fuzz.py``): each parser in a child process on the stored regression inputs
  (``tests/fuzz_corpus/<parser>/``) and 1,000 generated inputs of campaign seed 0 -- the same inputs every run.
- ``make fuzz`` (``python tests/fuzzing.py``): a long campaign with a fresh random seed (at least 20,000 inputs per
  parser by default). A supervisor restarts the worker after a crash, skipping the input that killed it; findings
  and crashes are written to ``fuzz-findings/<parser>/`` to be added to the corpus.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz_corpus"


# --- crafted CIFAR pickles: numpy's pickle layout with any dtype, shape and state -----------------------------------


class CraftedDType:
    """Pickles as ``numpy.dtype(code, False, True)`` with ``state``: any code, any state."""

    def __init__(self, code, state=(3, "|", None, None, None, -1, -1, 0)):
        self.code, self.state = code, state

    def __reduce__(self):
        return (np.dtype, (self.code, False, True), self.state)


class CraftedArray:
    """Pickles as numpy's ``_reconstruct(ndarray, (0,), b'b')`` + ``BUILD (1, shape, dtype, fortran, raw)``."""

    def __init__(self, shape, dtype, raw, fortran=False, version=1):
        self.state = (version, shape, dtype, fortran, raw)

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
        return (core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state)


def cifar_batch(n=2, protocol=2, label_key=b"labels", data=None, labels=None, extra=None) -> bytes:
    data = np.arange(n * 3072, dtype=np.uint8).reshape(n, 3072) if data is None else data
    batch = {b"batch_label": b"training batch 1 of 5", label_key: list(range(n)) if labels is None else labels,
             b"data": data, b"filenames": [b"img%d.png" % i for i in range(n)]}
    if extra:
        batch.update(extra)
    return pickle.dumps(batch, protocol=protocol)


_DTYPE_CODES = ["u1", "O8", "O", "V8", "S8", "U2", "M8", "m8[s]", "f8", "i8", "c16", "b1", "<i4", ">f4", "u8",
                "f2", "O4", "V", "(2,)u1", "i4,i4", "", "xyz", "u1\x00", 7]


def crafted_cifar(rng: random.Random) -> bytes:
    """A structure-aware hostile CIFAR file: a crafted array under a CIFAR key, with a random dtype/shape/state."""
    code = rng.choice(_DTYPE_CODES)
    order = rng.choice(["|", "<", ">", "=", "!", b"|", 0])
    dstate = rng.choice([
        (3, order, None, None, None, -1, -1, 0),
        (4, order, None, None, None, -1, -1, 0, None),
        (3, order, (CraftedDType("u1"), (2,)), None, None, -1, -1, 0),
        (3, order, None, ("a",), {"a": (CraftedDType("O8"), 0)}, 8, 1, 63),
        (4, order, None, None, None, -1, -1, 0, {"meta": 1}),
        (), None, "state",
    ])
    dtype = CraftedDType(code, dstate)
    n = rng.choice([0, 1, 2, 3, 8, 1 << 20, 1 << 40, -1])
    shape = rng.choice([(n,), (n, 3072), (2, n), (), (1,) * 9, ("a",), (1.5,), [2]])
    size = rng.choice([0, 1, 8, 16, 24, 6144])
    raw = rng.choice([bytes(rng.getrandbits(8) for _ in range(size)), [0, 1], None, "text", bytearray(size)])
    array = CraftedArray(shape, dtype, raw, rng.choice([False, True, 1]), rng.choice([1, 1, 1, 2]))
    where = rng.choice(["data", "labels", "extra", "nested"])
    protocol = rng.choice([2, 3, 4, 5])
    if where == "data":
        return cifar_batch(protocol=protocol, data=array)
    if where == "labels":
        return cifar_batch(protocol=protocol, labels=rng.choice([array, [array], [0, array]]))
    if where == "extra":
        return cifar_batch(protocol=protocol, extra={b"coarse": array})
    return cifar_batch(protocol=protocol, extra={b"more": {b"inner": [array, {b"x": array}]}})


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as the real CIFAR files have them."""

    def save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_py2_str


def py2_cifar_batch(n=2, label_key=b"labels") -> bytes:
    """A batch laid out byte for byte like the official Python-2 files: py2 strings, ``numpy.core`` globals."""
    array = CraftedArray((n, 3072), CraftedDType(b"u1", (3, b"|", None, None, None, -1, -1, 0)),
                         bytes(range(256)) * (12 * n))
    batch = {b"batch_label": b"training batch 1 of 5", label_key: list(range(n)), b"data": array,
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(batch)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def hostile_cifar_files() -> Dict[str, bytes]:
    """Named CIFAR files for the regression corpus: ``valid-*`` must load, every other one must be refused."""
    u1 = CraftedDType("u1")
    obj = CraftedDType("O8")
    files = {
        "valid-py2-protocol2": py2_cifar_batch(),
        "valid-py3-protocol2": cifar_batch(protocol=2),
        "valid-py3-protocol4": cifar_batch(protocol=4),
        "valid-py3-protocol5": cifar_batch(protocol=5),
        "object-dtype-data": cifar_batch(data=CraftedArray((2, 3072), obj, b"A" * (8 * 2 * 3072))),
        "object-dtype-data-small": cifar_batch(data=CraftedArray((3,), obj, b"\x41" * 24)),
        "object-dtype-labels": cifar_batch(labels=CraftedArray((2,), obj, b"\x10" * 16)),
        "object-dtype-in-label-list": cifar_batch(labels=[0, CraftedArray((1,), obj, b"\x10" * 8)]),
        "object-dtype-under-extra-key": cifar_batch(extra={b"coarse_labels": CraftedArray((1,), obj, b"\x10" * 8)}),
        "object-dtype-nested": cifar_batch(extra={b"meta": {b"x": [CraftedArray((1,), obj, b"\x10" * 8)]}}),
        "object-array-list-state": cifar_batch(data=CraftedArray((2,), obj, [0, 1])),
        "void-dtype": cifar_batch(data=CraftedArray((1,), CraftedDType("V8"), bytes(8))),
        "structured-dtype": cifar_batch(data=CraftedArray(
            (1,), CraftedDType("V8", (3, "|", None, ("a",), {"a": (CraftedDType("O8"), 0)}, 8, 1, 63)), bytes(8))),
        "subarray-dtype": cifar_batch(data=CraftedArray(
            (1,), CraftedDType("V16", (3, "|", (CraftedDType("O8"), (2,)), None, None, 16, 8, 63)), bytes(16))),
        "string-dtype": cifar_batch(data=CraftedArray((1,), CraftedDType("S8"), bytes(8))),
        "datetime-dtype": cifar_batch(data=CraftedArray((1,), CraftedDType("M8"), bytes(8))),
        "dtype-odd-arguments": cifar_batch(data=CraftedArray((1,), CraftedDType(7), bytes(1))),
        "dtype-odd-state": cifar_batch(data=CraftedArray((1,), CraftedDType("u1", "state"), bytes(1))),
        "dtype-bad-byte-order": cifar_batch(data=CraftedArray((1,), CraftedDType("u1", (3, "!", None, None, None, -1, -1, 0)), bytes(1))),
        "shape-buffer-mismatch": cifar_batch(data=CraftedArray((2, 3072), u1, bytes(100))),
        "shape-negative": cifar_batch(data=CraftedArray((-1, 3072), u1, bytes(3072))),
        "shape-huge": cifar_batch(data=CraftedArray((1 << 40, 1 << 40), u1, bytes(16))),
        "shape-huge-product-overflows-int64": cifar_batch(data=CraftedArray((1 << 32, 1 << 32, 1 << 32), u1, bytes(0))),
        "shape-not-integers": cifar_batch(data=CraftedArray((2.5, "x"), u1, bytes(3))),
        "shape-too-many-dims": cifar_batch(data=CraftedArray((1,) * 40, u1, bytes(1))),
        "array-flag-not-bool": cifar_batch(data=CraftedArray((2, 3072), u1, bytes(6144), fortran="yes")),
        "array-state-version-2": cifar_batch(data=CraftedArray((2, 3072), u1, bytes(6144), version=2)),
        "labels-deeply-nested": cifar_batch(labels=[[[[[[0]]]]]] * 2),
        "labels-huge-int": cifar_batch(labels=[1 << 80, 0]),
        "data-wrong-dtype": cifar_batch(data=np.zeros((2, 3072), np.float32)),
        "not-a-dict": pickle.dumps([1, 2, 3], protocol=2),
        "code-execution": b"cos\nsystem\n(S'echo pwned'\ntR.",
        "numpy-load-global": b"\x80\x02cnumpy\nload\nq\x00.",
        "empty": b"",
    }
    return files


# --- generic mutations --------------------------------------------------------------------------------------------


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, ord("0"), ord("\n"), ord(","), ord('"'), ord("{")]


def mutate(rng: random.Random, seeds: List[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(300)))
    blob = bytearray(rng.choice(seeds))
    if choice < 0.2 and len(seeds) > 1:  # splice two seeds
        other = rng.choice(seeds)
        blob = blob[: rng.randrange(len(blob) + 1)] + other[rng.randrange(len(other) + 1):]
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        op, pos = rng.randrange(6), rng.randrange(len(blob) + 1)
        if op == 0 and blob:  # overwrite
            blob[min(pos, len(blob) - 1)] = rng.getrandbits(8)
        elif op == 1:  # insert
            blob[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 9)))
        elif op == 2:  # delete a range
            del blob[pos : pos + rng.randrange(1, 17)]
        elif op == 3 and blob:  # an interesting byte
            blob[min(pos, len(blob) - 1)] = rng.choice(_INTERESTING)
        elif op == 4:  # duplicate a range
            blob[pos:pos] = blob[pos : pos + rng.randrange(1, 33)]
        else:  # truncate
            del blob[pos:]
    return bytes(blob)


# --- the parsers under test ---------------------------------------------------------------------------------------


def _idx_seeds() -> List[bytes]:
    def idx(code, shape, payload):
        return bytes([0, 0, code, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + payload

    return [idx(8, (2, 2, 2), bytes(8)), idx(8, (3,), bytes([0, 1, 2])), idx(0x0D, (2,), b"\x3f\x80\x00\x00" * 2),
            idx(0x0C, (1, 2), bytes(8))]


def _cifar_seeds() -> List[bytes]:
    return [cifar_batch(protocol=p) for p in (2, 4, 5)] + [cifar_batch(protocol=2, label_key=b"fine_labels")]


def _checkpoint_seed() -> bytes:
    from safetensors.torch import save

    import torch

    meta = {"format": "ccar-checkpoint-1", "meta": json.dumps({"epoch": 0, "history": [], "best_val": 0.5,
                                                               "seconds": 1.0}),
            "optimizer": json.dumps({"param_groups": [], "plain": {}})}
    return save({"model.w": torch.zeros(2, 3), "optim.0.momentum_buffer": torch.ones(3)}, metadata=meta)


def _gen_idx(rng, seeds):
    blob = mutate(rng, seeds)
    return gzip.compress(blob, mtime=0) if rng.random() < 0.3 else blob


def _gen_cifar(rng, seeds):
    if rng.random() < 0.4:
        blob = crafted_cifar(rng)
        return mutate(rng, [blob]) if rng.random() < 0.3 else blob
    return mutate(rng, seeds)


def _run_idx(path: Path, root: Path):
    from ccar.data.sources import read_idx

    read_idx(path)


def _run_cifar(path: Path, root: Path):
    from ccar.data.sources import _cifar_arrays, safe_unpickle

    loaded = safe_unpickle(path)
    repr(loaded)  # touches every element, as printing a loaded file would
    for value in loaded.values():
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            raise AssertionError(f"an array of dtype {value.dtype} escaped the reader")
    _cifar_arrays(path, "labels", 10)


def _run_list(path: Path, root: Path):
    from ccar.data.sources import read_image_list

    read_image_list(path, root)


def _run_inat(path: Path, root: Path):
    from ccar.data.sources import read_inat_json

    read_inat_json(path, root)


def _run_csv(path: Path, root: Path):
    from ccar.data.tabular import read_csv

    read_csv(path, impute="mean" if path.stat().st_size % 2 else "none")


def _features_seed() -> List[bytes]:
    buf = io.BytesIO()
    np.savez(buf, X=np.arange(6, dtype=np.float32).reshape(3, 2), y=np.array([0, 1, 1]))
    plain = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, X=np.ones((2, 2)), y=np.array(["a", "b"]))
    return [plain, buf.getvalue()]


def _run_features(path: Path, root: Path):
    from ccar.data.tabular import read_feature_file

    folder = root / "features"
    folder.mkdir(exist_ok=True)
    (folder / "train.npz").write_bytes(path.read_bytes())
    read_feature_file(folder, "train")


def _image_seeds() -> List[bytes]:
    from PIL import Image

    out = []
    for fmt in ("PNG", "JPEG", "BMP", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _run_image(path: Path, root: Path):
    from ccar.data.folders import decode_image

    decode_image(path, 8)


def _run_checkpoint(path: Path, root: Path):
    from ccar.engine.checkpoint import load_weights, read_checkpoint

    read_checkpoint(path)
    load_weights(path)


def _run_yaml(path: Path, root: Path):
    from ccar.engine.config import load_config

    load_config(str(path))


def _run_override(path: Path, root: Path):
    from ccar.engine.config import load_config

    load_config(None, [path.read_bytes().decode("utf-8", "surrogateescape")])


_YAML_SEEDS = [b"dataset: fashion-mnist-lt\nepochs: 15\noptim: {lr: 0.1, milestones: [5, 8]}\nloss: {name: ccar, omega: 0.75}\n",
               b"model:\n  name: mlp\n  hidden: [64]\nval_fraction: 0.2\nimbalance: 10\n", b"epochs: -3\n", b"{}\n"]
_OVERRIDE_SEEDS = [b"epochs=3", b"optim.lr=0.05", b"loss.omega=0.9", b"optim.milestones=[3, 6]", b"imbalance=100",
                   b"val_fraction=0.5", b"optim.batch_size=0", b"loss.name=ccar", b"model.hidden=[8, 8]",
                   # YAML 1.1's boolean and null words, which string keys take as text
                   b"amp=off", b"sampler=no", b"compile=yes", b"channels_last=on", b"loss.normalize=null",
                   b"tau_norm=none", b"amp=~"]

# name -> (seed inputs, generator(rng, seeds) -> bytes, run(path, root))
TARGETS: Dict[str, Tuple[Callable[[], List[bytes]], Callable, Callable]] = {
    "idx": (_idx_seeds, _gen_idx, _run_idx),
    "cifar": (_cifar_seeds, _gen_cifar, _run_cifar),
    "list": (lambda: [b"train/c0/0.jpg 0\ntrain/c1/0.jpg 1\n", b"a/b.jpg 3\n\n../x 1\n"], mutate, _run_list),
    "inat-json": (lambda: [b'{"images":[{"id":0,"file_name":"a.jpg"}],"annotations":[{"image_id":0,"category_id":0}],'
                           b'"categories":[{"id":0,"name":"x"}]}'], mutate, _run_inat),
    "csv": (lambda: [b"a,b,label\n1,2,x\n3,4,y\n", b"f1;f2\n1e3,2,0\n\"q\",1,1\n",
                     b"size,colour,w,label\n1.5,red,,a\n2,blue,3,b\n,red,1,a\n"], mutate, _run_csv),
    "features-npz": (_features_seed, mutate, _run_features),
    "image": (_image_seeds, mutate, _run_image),
    "safetensors": (lambda: [_checkpoint_seed()], mutate, _run_checkpoint),
    "yaml-config": (lambda: _YAML_SEEDS, mutate, _run_yaml),
    "override": (lambda: _OVERRIDE_SEEDS, mutate, _run_override),
}


def generate(target: str, seed: int, index: int, seeds: List[bytes]) -> bytes:
    rng = random.Random(f"{target}:{seed}:{index}")
    return TARGETS[target][1](rng, seeds)


# --- the worker: one parser, a range of inputs, one line per input ----------------------------------------------------


def worker(target: str, seed: int, start: int, count: int, corpus: bool) -> int:
    """Run ``target`` on the corpus (if asked) and inputs start..start+count-1; print progress for the supervisor."""
    from ccar.errors import CCARError

    seeds_fn, _, run = TARGETS[target]
    seeds = seeds_fn()
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix=f"ccar-fuzz-{target}-") as tmp:
        root, path = Path(tmp), Path(tmp) / "input"
        inputs: List[Tuple[str, Callable[[], bytes]]] = []
        if corpus and (CORPUS / target).is_dir():
            inputs += [(f"corpus:{p.name}", p.read_bytes) for p in sorted((CORPUS / target).iterdir())]
        inputs += [(str(i), (lambda i=i: generate(target, seed, i, seeds))) for i in range(start, start + count)]
        for n, (name, make) in enumerate(inputs):
            blob = make()
            path.write_bytes(blob)
            out.write(f"S {name}\n")
            out.flush()
            try:
                run(path, root)
                out.write("A\n")
            except CCARError:
                out.write("R\n")
            except Exception as exc:  # a finding: anything but ccar's own error escaped
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().replace("\n", " | ")
                out.write(f"F {detail[:300]}\n")
            if n % 200 == 199:
                gc.collect()  # a half-built object must also survive being collected
    out.write("END\n")
    out.flush()
    return 0


# --- the supervisor: restart after a crash, save what crashed --------------------------------------------------------


def run_target(target: str, seed: int, count: int, corpus: bool, findings_dir: Path = None, timeout: float = 3600):
    """Run ``count`` inputs of ``target`` in child processes, restarting after a crash. Returns a summary dict."""
    summary = {"target": target, "seed": seed, "inputs": 0, "accepted": 0, "rejected": 0, "findings": [],
               "crashes": []}
    start, use_corpus = 0, corpus
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "0"}
    while True:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--seed", str(seed),
               "--start", str(start), "--count", str(count - start)] + (["--corpus"] if use_corpus else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent)
        last, finished = None, False  # `last`: an input that started and has no outcome yet
        for line in proc.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "S":
                last = rest
                summary["inputs"] += 1
            elif kind in ("A", "R"):
                summary["accepted" if kind == "A" else "rejected"] += 1
                last = None
            elif kind == "F":
                summary["findings"].append((last, rest))
                last = None
            elif kind == "END":
                finished = True
        if proc.returncode == 0 and finished:
            break
        # The worker died on input `last` (or could not start at all): record it, then go on after it.
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
        summary["crashes"].append((last, proc.returncode, tail))
        if last is None:
            break
        use_corpus = False  # the corpus runs first: a crash there restarts at generated input 0
        start = 0 if last.startswith("corpus:") else int(last) + 1
        if start >= count:
            break
    if findings_dir is not None:
        seeds = TARGETS[target][0]()
        for name, *_ in summary["findings"] + summary["crashes"]:
            if name and not name.startswith("corpus:"):
                d = findings_dir / target
                d.mkdir(parents=True, exist_ok=True)
                (d / f"seed{seed}-input{name}").write_bytes(generate(target, seed, int(name), seeds))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=20_000, help="generated inputs per parser (default 20,000)")
    p.add_argument("--seed", type=int, default=None, help="campaign seed (default: from the clock, printed)")
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--findings", default="fuzz-findings", help="folder for inputs that crashed or escaped")
    p.add_argument("--write-corpus", action="store_true", help="(re)write the crafted CIFAR files into the corpus")
    p.add_argument("--worker", choices=list(TARGETS), help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--corpus", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_corpus:
        (CORPUS / "cifar").mkdir(parents=True, exist_ok=True)
        for name, blob in hostile_cifar_files().items():
            (CORPUS / "cifar" / name).write_bytes(blob)
        return 0
    if args.worker:
        return worker(args.worker, args.seed or 0, args.start, args.count, args.corpus)
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    print(f"fuzz campaign: seed {seed}, {args.inputs:,} generated inputs per parser plus the stored corpus; "
          f"each parser in its own process, restarted after a crash")
    bad = 0
    for target in args.targets:
        t0 = time.perf_counter()
        s = run_target(target, seed, args.inputs, corpus=True, findings_dir=Path(args.findings))
        bad += len(s["findings"]) + len(s["crashes"])
        print(f"{target:12s} {s['inputs']:>7,} inputs  accepted {s['accepted']:>6,}  rejected {s['rejected']:>6,}  "
              f"findings {len(s['findings'])}  crashes {len(s['crashes'])}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        for name, detail in s["findings"][:5]:
            print(f"    finding at input {name}: {detail}")
        for name, code, err in s["crashes"][:5]:
            print(f"    crash at input {name}: exit status {code} {' '.join(err)}")
    print(f"total findings + crashes: {bad}" + (f" (inputs saved under {args.findings}/)" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
