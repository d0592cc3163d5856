"""ccar.data on generated files in the real formats, the published subset sizes, and hostile input."""

import io
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ccar import DataError
from ccar.data import (
    DeviceLoader,
    ImageFileDataset,
    build_dataset,
    download,
    load_source,
    long_tail_counts,
    long_tail_indices,
    random_crop_flip,
    read_cifar,
    read_csv,
    read_idx,
    read_image_list,
    read_inat_json,
    safe_unpickle,
    stratified_split,
)
from ccar.data import downloads as dl
from conftest import make_cifar, make_csv, make_idx_dataset, make_image_tree, write_idx


# --- profiles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_max,classes,imbalance,total", [(500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573), (5000, 10, 100, 12406)])
def test_published_subset_sizes(n_max, classes, imbalance, total):
    assert sum(long_tail_counts(n_max, classes, imbalance)) == total


def test_step_profile_and_errors():
    assert long_tail_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    with pytest.raises(DataError, match="imbalance must be a number >= 1"):
        long_tail_counts(100, 4, 0.5)
    with pytest.raises(DataError, match="leaves class 2 empty"):
        long_tail_counts(10, 4, 100)
    with pytest.raises(DataError, match="profile"):
        long_tail_counts(10, 4, 2, "linear")


def test_subset_selection_is_ldam_drws_procedure():
    targets = np.repeat(np.arange(10), 50)
    np.random.default_rng(1).shuffle(targets)
    counts = long_tail_counts(50, 10, 10)
    # The reference procedure, written against numpy's global RNG as in imbalance_cifar.py.
    np.random.seed(0)
    want = []
    for c, n in zip(np.unique(targets), counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        want.extend(idx[:n])
    assert long_tail_indices(targets, counts, seed=0).tolist() == [int(i) for i in want]


@given(st.lists(st.integers(1, 30), min_size=1, max_size=8), st.floats(0.05, 0.5), st.integers(0, 100))
def test_stratified_split_properties(per_class, fraction, seed):
    targets = np.repeat(np.arange(len(per_class)), per_class)
    train, val = stratified_split(targets, fraction, seed)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(targets)))
    for c, n in enumerate(per_class):
        n_train, n_val = (targets[train] == c).sum(), (targets[val] == c).sum()
        assert n_train >= 1
        if n >= 2:
            assert n_val >= 1
    assert np.array_equal(stratified_split(targets, fraction, seed)[1], val)


# --- sources -------------------------------------------------------------------------------------------------------


def test_idx_gz_and_raw(tmp_path):
    for gz in (True, False):
        root = make_idx_dataset(tmp_path / f"d{gz}", gz=gz)
        x, y = load_source("mnist", str(root), "train")
        assert x.shape == (400, 1, 8, 8) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.bincount(y).tolist() == [40] * 10


def test_idx_bad_files(tmp_path):
    good = write_idx(tmp_path / "a", np.zeros((3, 2, 2), np.uint8), gz=False)
    raw = good.read_bytes()
    (tmp_path / "magic").write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(DataError, match="wrong magic number"):
        read_idx(tmp_path / "magic")
    (tmp_path / "trunc").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="not a valid gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "missing")


def test_idx_count_mismatch_and_label_range(tmp_path):
    root = make_idx_dataset(tmp_path / "d")
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="400 images but .* 7 labels"):
        load_source("mnist", str(root), "train")
    write_idx(root / "train-labels-idx1-ubyte", np.full(400, 12, np.uint8))
    with pytest.raises(DataError, match="label 12 is out of range for 10 classes"):
        load_source("mnist", str(root), "train")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, name):
    root = make_cifar(tmp_path, name)
    x, y = read_cifar(root, name, "train")
    classes = 10 if name == "cifar10" else 100
    assert x.shape == (6 * classes * (5 if name == "cifar10" else 1), 3, 32, 32) and x.dtype == np.uint8
    xt, yt = load_source(name, str(root), "test")
    assert len(xt) == 2 * classes and yt.max() == classes - 1


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    bad.parent.mkdir()
    bad.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="posix.system|os.system|not allowed"):
        safe_unpickle(bad)
    with pytest.raises(DataError):
        read_cifar(tmp_path, "cifar10", "train")
    assert not marker.exists()


def test_csv_string_labels_and_errors(tmp_path):
    root = make_csv(tmp_path / "c")
    x, y, names = read_csv(root / "train.csv")
    assert names == ["cat", "dog", "emu"] and x.shape == (56, 3) and np.bincount(y).tolist() == [40, 12, 4]
    (tmp_path / "short.csv").write_text("a,b,label\n1,2\n")  # a missing trailing field is a missing value
    with pytest.raises(DataError, match="column 'label' is empty at line 2|missing value"):
        read_csv(tmp_path / "short.csv")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,x\n1,2,3,4,5\n")
    with pytest.raises(DataError, match="ragged.csv is malformed"):
        read_csv(tmp_path / "ragged.csv")
    with pytest.raises(DataError, match="no column 'nope'"):
        read_csv(root / "train.csv", label_column="nope")


def test_csv_categorical_columns_missing_values_and_saved_preprocessing(tmp_path):
    from ccar.data import TabularPreprocessing
    from ccar.data.tabular import read_frame

    train_csv = tmp_path / "train.csv"
    train_csv.write_text("size,colour,weight,label\n1.0,red,3,a\n2.0,blue,,b\n3.0,,5,a\n4.0,red,7,c\n")
    frame = read_frame(train_csv)
    with pytest.raises(DataError, match="column 'colour' has a missing value at line 4; fill it in or set csv_impute=mean"):
        TabularPreprocessing.fit(frame, train_csv).transform(frame, train_csv)
    prep = TabularPreprocessing.fit(frame, train_csv, impute="mean")
    assert prep.numeric == ["size", "weight"] and prep.categorical == {"colour": ["blue", "red"]}
    assert prep.feature_names == ["size", "colour=blue", "colour=red", "weight"]
    x, y = prep.transform(frame, train_csv)
    assert x[1].tolist() == [2.0, 1.0, 0.0, 5.0]  # weight imputed with the training mean (3 + 5 + 7) / 3
    assert x[2].tolist() == [3.0, 0.0, 1.0, 5.0]  # colour imputed with the most frequent category
    assert y.tolist() == [0, 1, 0, 2]
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("size,colour,weight,label\n5.0,green,1,b\n")  # an unseen category: an all-zero one-hot
    assert prep.transform(read_frame(test_csv), test_csv)[0].tolist() == [[5.0, 0.0, 0.0, 1.0]]
    test_csv.write_text("size,colour,weight,label\nbig,red,1,b\n")
    with pytest.raises(DataError, match="column 'size' line 2: 'big' is not a number"):
        prep.transform(read_frame(test_csv), test_csv)
    prep.save(tmp_path / "p.json", [0.0] * 4, [1.0] * 4)
    again, mean, std = TabularPreprocessing.load(tmp_path / "p.json")
    assert again == prep and mean == [0.0] * 4


def test_features_dataset_from_npz_safetensors_and_npy(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)).astype(np.float32), np.repeat([0, 1, 2], [40, 15, 5])
    np.savez(tmp_path / "train.npz", X=x, y=y)
    save_file({"X": x[:9], "y": np.array([0, 1, 2] * 3)}, str(tmp_path / "test.safetensors"))
    data = build_dataset("features", str(tmp_path), val_fraction=0.2)
    assert data.kind == "tabular" and data.input_shape == (5,) and data.class_names == ["0", "1", "2"]
    assert sum(data.class_counts) + len(data.val[1]) == 60 and len(data.test[1]) == 9
    names = tmp_path / "named"
    names.mkdir()
    np.save(names / "train_X.npy", x)
    np.save(names / "train_y.npy", np.array(["cat", "dog", "emu"])[y])
    np.save(names / "test_X.npy", x[:3])
    np.save(names / "test_y.npy", np.array(["emu", "cat", "dog"]))
    named = build_dataset("features", str(names))
    assert named.class_names == ["cat", "dog", "emu"] and named.test[1].tolist() == [2, 0, 1]
    np.save(names / "test_y.npy", np.array([object(), 1], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read the test file"):  # object arrays are never unpickled
        build_dataset("features", str(names))


def test_list_file_and_inat_json(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    paths, labels = read_image_list(root / "ImageNet_LT_train.txt", root)
    assert len(paths) == 10 and np.bincount(labels).tolist() == [6, 3, 1]
    paths2, labels2, names = read_inat_json(root / "train2018.json", root)
    assert paths2 == paths and names[2] == "s2"
    ds = ImageFileDataset(build_dataset("imagenet-lt", str(root)).train, train=True, size=8)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    x, _ = ImageFileDataset(ds.files, train=False, size=8)[1]
    assert x.shape == (3, 8, 8)


def test_list_file_refuses_escaping_paths(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    for bad in ("/etc/passwd 0", "../../etc/passwd 0", "train/../../x.jpg 1"):
        (root / "evil.txt").write_text(bad + "\n")
        with pytest.raises(DataError, match="refused"):
            read_image_list(root / "evil.txt", root)
    (root / "evil.txt").write_text("train/c0/0.jpg notanumber\n")
    with pytest.raises(DataError, match="not an integer"):
        read_image_list(root / "evil.txt", root)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    (root / "train" / "c0" / "0.jpg").write_bytes(b"not a jpeg")
    ds = ImageFileDataset(build_dataset("imagenet-lt", str(root)).train, train=False, size=8)
    with pytest.raises(DataError, match=r"cannot decode image .*0\.jpg"):
        ds[0]


# --- catalog ---------------------------------------------------------------------------------------------------------


def test_build_synthetic_long_tail(idx_root):
    data = build_dataset("mnist-lt", str(idx_root), imbalance=10, val_fraction=0.2, seed=3)
    want = long_tail_counts(40, 10, 10)
    n_val = len(data.val[1])
    assert sum(data.class_counts) + n_val == sum(want)
    assert data.class_counts[0] > data.class_counts[-1]
    assert len(data.test[1]) == 60 and data.augment.flip is False  # digits are not flipped
    again = build_dataset("mnist-lt", str(idx_root), imbalance=10, val_fraction=0.2, seed=3)
    assert torch.equal(again.train[0], data.train[0]) and torch.equal(again.val[1], data.val[1])


def test_build_csv_and_natural_rejects_imbalance(csv_root, tmp_path):
    data = build_dataset("csv", str(csv_root), val_fraction=0.25)
    assert data.class_names == ["cat", "dog", "emu"] and data.kind == "tabular"
    assert data.train[0].dtype == torch.float32
    with pytest.raises(DataError, match="natural long tail"):
        build_dataset("csv", str(csv_root), imbalance=10)
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset("cifar-lt")
    with pytest.raises(DataError, match="no IDX files"):
        build_dataset("mnist-lt", str(tmp_path))


def test_explicit_n_max_beyond_a_class_is_named(tmp_path):
    root = make_idx_dataset(tmp_path / "d", n_per_class=(40,) * 9 + (1,))
    with pytest.raises(DataError, match=r"class 9 has 1 training images, fewer than the 4 that n_max=40 asks for"):
        build_dataset("mnist-lt", str(root), imbalance=10, n_max=40)


MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)  # the official files' classes


def test_mnist_lt_on_mnists_real_unequal_class_sizes(tmp_path, capsys):
    root = make_idx_dataset(tmp_path / "mnist", n_per_class=MNIST_TRAIN_COUNTS, test_per_class=3, size=4)
    data = build_dataset("mnist-lt", str(root), imbalance=100, val_fraction=0.1)
    want = long_tail_counts(5421, 10, 100)  # the head count is the smallest class, so every class can supply its share
    assert want[0] == 5421 and want[-1] == 54
    assert sum(data.class_counts) + len(data.val[1]) == sum(want)
    assert np.bincount(np.concatenate([data.train[1].numpy(), data.val[1].numpy()])).tolist() == want
    assert f"counts {data.class_counts}" in data.summary() and "head n_max=5421 (the smallest source class" in data.summary()
    with pytest.raises(DataError, match="class 0 has 5923 training images, fewer than the 6742"):
        build_dataset("mnist-lt", str(root), imbalance=100, n_max=6742)
    assert build_dataset("mnist-lt", str(root), imbalance=100, n_max=5000).class_counts[0] < 5000


def test_cifar10_lt_on_unequal_classes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = np.repeat(np.arange(10), [12 - c // 2 for c in range(10)] if name != "test_batch" else 2)
        batch = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    data = build_dataset("cifar10-lt", str(tmp_path), imbalance=5, val_fraction=0.0)
    assert data.class_counts == long_tail_counts(5 * 8, 10, 5)  # smallest class: 5 files x 8 images


# --- loaders ---------------------------------------------------------------------------------------------------------


def test_device_loader_is_deterministic_and_covers_every_sample(idx_root):
    data = build_dataset("mnist-lt", str(idx_root), imbalance=2, val_fraction=0.0)
    x, y = data.train
    loader = DeviceLoader(x, y, 32, data.augment, seed=5)
    first = [b for b in loader]
    again = [b for b in DeviceLoader(x, y, 32, data.augment, seed=5)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == sorted(y.tolist())
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], first[0][1])
    shards = [torch.cat([b[1] for b in DeviceLoader(x, y, 8, seed=5, rank=r, world_size=2)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == (len(y) + 1) // 2


def test_random_crop_flip_matches_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (6, 2, 5, 5), dtype=torch.uint8)
    out = random_crop_flip(images, 2, True, g)
    g.manual_seed(0)
    offsets = torch.randint(0, 5, (2, 6), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        want = padded[i, :, offsets[0, i] : offsets[0, i] + 5, offsets[1, i] : offsets[1, i] + 5]
        assert torch.equal(out[i], want.flip(2) if flips[i] else want)


# --- downloads -------------------------------------------------------------------------------------------------------


class _Response(io.BytesIO):
    headers = {}


def test_download_verifies_and_leaves_nothing_half_written(tmp_path):
    payload = b"hello long tail"
    good = "md5:" + __import__("hashlib").md5(payload).hexdigest()
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match="checksum mismatch"):
        download("http://x/f", dest, "md5:" + "0" * 32, opener=lambda url, timeout: _Response(payload))
    assert list(tmp_path.iterdir()) == []

    class Broken(_Response):
        def read(self, n=-1):
            raise ConnectionResetError("connection reset mid-transfer")

    with pytest.raises(ConnectionResetError):
        download("http://x/f", dest, good, opener=lambda url, timeout: Broken())
    assert list(tmp_path.iterdir()) == []
    download("http://x/f", dest, good, opener=lambda url, timeout: _Response(payload), progress=False)
    assert dest.read_bytes() == payload


def test_offline_download_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path))
    monkeypatch.delenv("CCAR_MNIST", raising=False)

    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="pass data_root=FOLDER"):
        load_source("mnist", None, "train")


def test_cifar_archive_download_and_safe_extract(tmp_path):
    import tarfile

    src = make_cifar(tmp_path / "src", "cifar10")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = buf.getvalue()
    checksum = "md5:" + __import__("hashlib").md5(blob).hexdigest()
    dest = tmp_path / "dl" / "a.tar.gz"
    download("http://x/a.tar.gz", dest, checksum, opener=lambda u, timeout: _Response(blob), progress=False)
    dl.safe_extract_tar(dest, tmp_path / "dl")
    assert read_cifar(tmp_path / "dl", "cifar10", "test")[0].shape == (20, 3, 32, 32)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    with pytest.raises(DataError, match="unsafe member"):
        dl.safe_extract_tar(tmp_path / "evil.tar", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# --- real data -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_fashion_mnist_lt():
    data = build_dataset("fashion-mnist-lt", imbalance=100, val_fraction=0.1)
    assert data.train[0].shape[1:] == (1, 28, 28) and len(data.test[1]) == 10_000
    assert sum(data.class_counts) + len(data.val[1]) == sum(long_tail_counts(6000, 10, 100)) == 14_886
    assert np.bincount(data.test[1].numpy()).tolist() == [1000] * 10


def _real_mnist():
    from ccar.data import downloads

    folder = downloads.cache_dir() / "mnist"
    if not (folder / "train-images-idx3-ubyte").is_file() and not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real MNIST not fetched (sh scripts/get-mnist.sh; make test does it)")
    return folder


@pytest.mark.slow
def test_real_mnist_lt_on_the_official_files():
    folder = _real_mnist()
    data = build_dataset("mnist-lt", str(folder), imbalance=100, val_fraction=0.1)
    assert sum(data.class_counts) + len(data.val[1]) == sum(long_tail_counts(5421, 10, 100))  # MNIST's smallest class
    assert len(data.test[1]) == 10_000 and np.bincount(data.test[1].numpy()).min() == 892


@pytest.mark.slow
def test_real_mnist_png_folder_with_the_defaults(tmp_path, monkeypatch):
    """The practitioner's path: real digits as PNG class folders, no image_size given; >= 80 % test top-1."""
    import subprocess
    import sys

    from ccar.engine.config import load_config
    from ccar.engine.train import train

    folder = _real_mnist()
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path / "cache"))
    subprocess.run([sys.executable, "scripts/mnist-folder.py", str(tmp_path / "png"), "--data-root", str(folder)],
                   check=True, capture_output=True)
    lines = []
    metrics = train(load_config(None, ["dataset=folder", f"data_root={tmp_path / 'png'}", "model.name=cnn",
                                       "model.width=8", "epochs=15", "loss.name=la", "progress=false",
                                       f"out={tmp_path / 'run'}"]), log=lines.append)
    assert "images 28x28 (image_size=auto" in lines[0] and "no flip" in lines[0]
    assert metrics["top1"] >= 80.0


# --- a known optimum ---------------------------------------------------------------------------------------------


def test_gaussian_lt_profile_and_its_bayes_reference(tmp_path):
    from ccar.data.synthetic import GaussianLT, balanced_accuracy, nearest_mean_predictions
    from ccar.engine.config import load_config
    from ccar.engine.train import train

    spec = GaussianLT(num_classes=20, dim=8, separation=4.0, imbalance=100, test_per_class=50)
    x, y, xt, yt = spec.sample()
    counts = np.bincount(y).tolist()
    assert counts[0] == 500 and counts[-1] == 5 and counts == long_tail_counts(500, 20, 100)
    assert np.bincount(yt).tolist() == [50] * 20
    again = GaussianLT(num_classes=20, dim=8, separation=4.0, imbalance=100, test_per_class=50).sample()
    assert np.array_equal(again[0], x)  # fixed by data_seed, not by the run's seed
    bayes = balanced_accuracy(nearest_mean_predictions(xt, spec.means()), yt, 20)
    shifted = balanced_accuracy(nearest_mean_predictions(xt, spec.means() * 0.5), yt, 20)
    assert bayes > shifted  # the true means beat wrong ones on the same draws
    out = tmp_path / "run"
    metrics = train(load_config(None, ["dataset=gaussian-lt", "synthetic.num_classes=20", "synthetic.dim=8",
                                       "synthetic.separation=4", "synthetic.test_per_class=50", "model.name=mlp",
                                       "model.hidden=[]", "loss.name=la", "epochs=5", "threads=1", "progress=false",
                                       f"out={out}"]), log=lambda *_: None)
    assert metrics["bayes_balanced_accuracy"] == pytest.approx(bayes)
    assert metrics["balanced"] <= bayes + 2.0  # no model beats the Bayes rule beyond sampling noise
