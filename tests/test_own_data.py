"""Your own long-tailed data end to end: image folders, feature files, CSV with categories and gaps, ccar predict."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from ccar import ConfigError, DataError
from ccar.cli import main
from ccar.data import build_dataset
from ccar.data import folders as folders_mod
from ccar.engine.config import load_config
from ccar.engine.evaluate_run import evaluate_run
from ccar.engine.predict import predict_run
from ccar.engine.train import train

FAST = ["model.width=4", "optim.batch_size=16", "optim.lr=0.05", "threads=1", "progress=false"]
TAIL = {"ant": 14, "bee": 6, "cow": 3}  # a small long tail


def write_image(path, colour, size, fmt=None):
    from PIL import Image

    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    pixels = np.clip(np.asarray(colour)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)


def make_folder_tree(root, counts=TAIL, split=False):
    """Class folders of coloured images of unequal sizes and formats (a separable long tail)."""
    colours = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cow": (30, 30, 200)}
    for name, n in counts.items():
        for i in range(n):
            sub = ("test" if i % 3 == 0 else "train") if split else ""
            ext = ".png" if i % 2 else ".jpg"
            write_image(root / sub / name / f"{i}{ext}", colours[name], (20 + 3 * i, 18 + i))
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path / "cache"))


def test_folder_one_tree_carves_a_stratified_test_split(tmp_path):
    root = make_folder_tree(tmp_path / "photos")
    (root / "notes.txt").write_text("not a class folder, not an image")
    (root / "ant" / "readme.md").write_text("skipped: not an image")
    data = build_dataset("folder", str(root), image_size=16, val_fraction=0.2, progress=False)
    assert data.class_names == ["ant", "bee", "cow"] and data.kind == "image" and data.input_shape == (3, 16, 16)
    test_counts = np.bincount(data.test[1].numpy(), minlength=3)
    train_counts = np.asarray(data.class_counts) + np.bincount(data.val[1].numpy(), minlength=3)
    assert (test_counts >= 1).all() and (np.asarray(data.class_counts) >= 1).all()
    assert (train_counts + test_counts).tolist() == list(TAIL.values())
    assert data.train[0].dtype == torch.uint8 and data.train[0].shape[1:] == (3, 16, 16)
    again = build_dataset("folder", str(root), image_size=16, val_fraction=0.2, progress=False)
    assert torch.equal(again.test[0], data.test[0]) and torch.equal(again.train[1], data.train[1])


def test_folder_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    root = make_folder_tree(tmp_path / "photos")
    build_dataset("folder", str(root), image_size=12, progress=False)
    calls = []
    real = folders_mod.decode_image
    monkeypatch.setattr(folders_mod, "decode_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    build_dataset("folder", str(root), image_size=12, progress=False)
    assert calls == []  # everything came from the cache
    write_image(root / "cow" / "0.jpg", (250, 250, 0), (30, 30))
    os.utime(root / "cow" / "0.jpg", ns=(1, 10**18))
    changed = build_dataset("folder", str(root), image_size=12, progress=False)
    assert len(calls) > 0  # the changed file invalidated the cache: decoded again
    assert changed.kind == "image"


def test_folder_errors_name_the_file_or_class(tmp_path):
    root = make_folder_tree(tmp_path / "photos")
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*bee/broken\.jpg"):
        build_dataset("folder", str(root), image_size=12, progress=False)
    (root / "bee" / "broken.jpg").unlink()
    outside = tmp_path / "secret.png"
    write_image(outside, (0, 0, 0), (8, 8))
    (root / "ant" / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"symlink that leaves the data root"):
        build_dataset("folder", str(root), image_size=12, progress=False)
    (root / "ant" / "link.png").unlink()
    (root / "ant" / "inside.png").symlink_to(root / "ant" / "1.png")  # a link within the root is fine
    build_dataset("folder", str(root), image_size=12, progress=False)
    single = tmp_path / "single"
    make_folder_tree(single, {"ant": 4, "bee": 1})
    with pytest.raises(DataError, match="class 'bee' has 1 image"):
        build_dataset("folder", str(single), image_size=12, progress=False)
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("folder", str(tmp_path / "single" / "bee"), progress=False)


def test_one_class_is_an_error_for_every_kind_of_data(tmp_path, capsys):
    """A one-class folder trained and reported 100 %; now every dataset kind needs two classes."""
    one = make_folder_tree(tmp_path / "one", {"ant": 6})
    with pytest.raises(DataError, match=r"folder in .*one: found 1 class \(ant\); a classifier needs at least two"):
        build_dataset("folder", str(one), image_size=12, progress=False)
    assert main(["train", "dataset=folder", f"data_root={one}", "image_size=12", f"out={tmp_path / 'run'}", *FAST]) == 2
    assert "a classifier needs at least two" in capsys.readouterr().err
    table = tmp_path / "table"
    table.mkdir()
    for split in ("train", "test"):
        (table / f"{split}.csv").write_text("a,b,label\n" + "".join(f"{i},{i * 2},x\n" for i in range(8)))
    with pytest.raises(DataError, match="csv in .*table: found 1 class .*needs at least two"):
        build_dataset("csv", str(table), progress=False)
    feats = tmp_path / "feats"
    feats.mkdir()
    for split in ("train", "test"):
        np.savez(feats / f"{split}.npz", X=np.zeros((6, 3), np.float32), y=np.zeros(6, np.int64))
    with pytest.raises(DataError, match="features in .*feats: found 1 class"):
        build_dataset("features", str(feats), progress=False)


def test_folder_train_test_layout_and_streaming(tmp_path):
    root = make_folder_tree(tmp_path / "photos", split=True)
    data = build_dataset("folder", str(root), image_size=16, val_fraction=0.0, progress=False)
    assert len(data.test[1]) == sum((n + 2) // 3 for n in TAIL.values())
    streamed = build_dataset("folder", str(root), image_size=16, in_memory="false", progress=False)
    assert streamed.kind == "files" and len(streamed.test) == len(data.test[1])
    out = tmp_path / "run"
    train(load_config(None, ["dataset=folder", f"data_root={root}", "image_size=16", "in_memory=false", "workers=0",
                             "epochs=1", "val_fraction=0", f"out={out}", *FAST]), log=lambda *_: None)
    assert (out / "metrics.json").is_file()


def make_digit_folder(root, counts=(12, 6, 3), size=(28, 28)):
    """Grey, same-size 'digits' (a bright bar at a class-dependent row) in train/ and test/ class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        for split, m in (("train", n), ("test", 4)):
            for i in range(m):
                pixels = rng.integers(0, 40, (size[1], size[0])).astype(np.uint8)
                row = 4 + 8 * c
                pixels[row : row + 4] = 230
                (root / split / f"d{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(root / split / f"d{c}" / f"{i}.png")
    return root


def test_image_size_auto_keeps_native_grey_digits_and_does_not_flip_them(tmp_path):
    root = make_digit_folder(tmp_path / "digits")
    data = build_dataset("folder", str(root), progress=False)  # image_size=auto, the default
    assert data.input_shape == (1, 28, 28) and data.image_size == 28 and not data.augment.flip
    assert "image_size=auto: the images share one size, 28x28" in data.note and "no flip" in data.summary()
    assert 0 < data.augment.mean[0] < 0.5 and len(data.augment.std) == 1  # the images' own statistics
    out = tmp_path / "run"
    lines = []
    metrics = train(load_config(None, ["dataset=folder", f"data_root={root}", "epochs=2", "val_fraction=0",
                                       f"out={out}", *FAST]), log=lines.append)
    assert any("model.name=auto: cnn (28 px images)" in line for line in lines)
    saved = load_config(str(out / "config.yaml"))
    assert saved.model.name == "cnn" and saved.image_size == "auto"  # the model itself is recorded
    assert json.loads((out / "data.json").read_text())["image_size"] == 28
    assert main(["predict", str(out), str(root / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = _read_predictions(tmp_path / "p.csv")
    per_class = [100.0 * np.mean([r["top1"] == f"d{c}" for r in rows if f"/test/d{c}/" in r["input"]])
                 for c in range(3)]
    assert per_class == pytest.approx(metrics["per_class"])  # grey, 1 channel, the run's own normalisation
    from ccar.engine.build import dataset_from_config

    assert dataset_from_config(load_config(None, ["dataset=folder", f"data_root={root}", "augment.flip=true",
                                                  "progress=false"])).augment.flip


def test_image_size_auto_for_photos_of_mixed_sizes(tmp_path):
    root = tmp_path / "photos"
    for name, colour in (("ant", (200, 30, 30)), ("bee", (30, 200, 30))):
        for i, wh in enumerate([(120, 100), (150, 100), (100, 140), (100, 130)]):
            write_image(root / name / f"{i}.jpg", colour, wh)
    data = build_dataset("folder", str(root), progress=False)
    assert data.input_shape[0] == 3 and data.augment.flip  # colour: taken as photos
    assert data.image_size == 32 and "median shorter side 100 px" in data.note  # train split's median, then
    assert "colour images train at 32 px" in data.note  # the size measured best for colour (docs/benchmarks.md)
    assert build_dataset("folder", str(root), image_size=40, progress=False).image_size == 40  # explicit wins
    from ccar.engine.build import auto_model

    assert auto_model(data.input_shape)[0] == "cnn"
    name, why = auto_model((1, 100, 100))  # large grey images: ResNet-32 with its stem
    assert name == "resnet32" and "pretrained backbone" in why
    from ccar.models import build_model

    model = build_model("resnet32", 2, (3, 100, 100), depth=8)  # the downsampling stem from 96 px on
    assert isinstance(model.pool, torch.nn.MaxPool2d) and model(torch.zeros(2, 3, 100, 100)).shape == (2, 2)
    assert isinstance(build_model("resnet32", 2, (3, 32, 32), depth=8).pool, torch.nn.Identity)
    with pytest.raises(ConfigError, match="image_size must be auto or an integer >= 8"):
        load_config(None, ["image_size=big"])
    with pytest.raises(ConfigError, match="augment.flip must be auto, true or false"):
        load_config(None, ["augment.flip=sometimes"])


def test_model_auto_picks_the_mlp_for_tables(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 9)):
        y = np.arange(n) % 3
        np.savez(tmp_path / f"{split}.npz", X=(rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32), y=y)
    lines = []
    train(load_config(None, ["dataset=features", f"data_root={tmp_path}", "epochs=1", f"out={tmp_path / 'r'}",
                             *FAST]), log=lines.append)
    assert any("model.name=auto: mlp (4 features per row)" in line for line in lines)


def _read_predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_folder_train_then_predict_agrees_with_eval(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "photos", split=True)
    out = tmp_path / "run"
    train(load_config(None, ["dataset=folder", f"data_root={root}", "image_size=16", "epochs=4", "val_fraction=0",
                             f"out={out}", *FAST]), log=lambda *_: None)
    metrics = evaluate_run(out, "best")["metrics"]
    assert main(["predict", str(out), str(root / "test"), "--top-k", "2", "--out", str(tmp_path / "p.csv")]) == 0
    rows = _read_predictions(tmp_path / "p.csv")
    assert len(rows) == sum((n + 2) // 3 for n in TAIL.values())
    assert set(rows[0]) == {"input", "top1", "p1", "top2", "p2"} and float(rows[0]["p1"]) >= float(rows[0]["p2"])
    per_class = []
    for c, name in enumerate(["ant", "bee", "cow"]):
        mine = [r for r in rows if f"/test/{name}/" in r["input"]]
        per_class.append(100.0 * sum(r["top1"] == name for r in mine) / len(mine))
    assert per_class == pytest.approx(metrics["per_class"])  # the same predictions as `ccar eval`
    names, probs, classes = predict_run(out, [str(root / "test" / "ant" / "0.jpg")], top_k=1)
    assert classes == ["ant", "bee", "cow"] and probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-5
    assert main(["predict", str(out), str(root / "test"), "--out", str(tmp_path / "p.jsonl"), "posthoc_tau=1"]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"input", "top1", "p1"}


def test_csv_with_categories_and_gaps_trains_and_predicts(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "table"
    root.mkdir()
    for split, per in (("train", (60, 20, 6)), ("test", (6, 6, 6))):
        lines = ["height,colour,weight,species"]
        for c, n in enumerate(per):
            for i in range(n):
                weight = "" if (split == "train" and i == 1) else f"{rng.normal(c * 3, 0.4):.3f}"
                colour = ["red", "green", "blue"][c] if rng.random() < 0.9 else "green"
                lines.append(f"{rng.normal(c, 0.3):.3f},{colour},{weight},{['oak', 'elm', 'yew'][c]}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    args = ["dataset=csv", f"data_root={root}", "model.name=mlp", "model.hidden=[16]", "epochs=8", *FAST]
    with pytest.raises(DataError, match="column 'weight' has a missing value at line 3; fill it in or set csv_impute=mean"):
        train(load_config(None, args + [f"out={tmp_path / 'no'}"]), log=lambda *_: None)
    out = tmp_path / "run"
    train(load_config(None, args + ["csv_impute=mean", f"out={out}"]), log=lambda *_: None)
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep["categorical"] == {"colour": ["blue", "green", "red"]} and prep["class_names"] == ["elm", "oak", "yew"]
    metrics = evaluate_run(out, "best")["metrics"]
    assert main(["predict", str(out), str(root / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = _read_predictions(tmp_path / "p.csv")
    truth = [line.rsplit(",", 1)[1] for line in (root / "test.csv").read_text().splitlines()[1:]]
    assert rows[0]["input"].endswith("test.csv:2") and len(rows) == len(truth)
    top1 = 100.0 * np.mean([r["top1"] == t for r, t in zip(rows, truth)])
    assert top1 == pytest.approx(metrics["top1"]) and top1 > 60


def test_features_train_and_predict(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 8)) * 3
    counts = (50, 15, 5)
    y = np.repeat(np.arange(3), counts)
    x = (centers[y] + rng.normal(size=(len(y), 8))).astype(np.float32)
    yt = np.repeat(np.arange(3), 5)
    xt = (centers[yt] + rng.normal(size=(len(yt), 8))).astype(np.float32)
    np.savez(tmp_path / "train.npz", X=x, y=np.array(["a", "b", "c"])[y])
    np.savez(tmp_path / "test.npz", X=xt, y=np.array(["a", "b", "c"])[yt])
    out = tmp_path / "run"
    train(load_config(None, ["dataset=features", f"data_root={tmp_path}", "model.name=mlp", "model.hidden=[]",
                             "epochs=10", f"out={out}", *FAST]), log=lambda *_: None)
    metrics = evaluate_run(out, "best")["metrics"]
    names, probs, classes = predict_run(out, [str(tmp_path / "test.npz")])
    assert classes == ["a", "b", "c"] and len(names) == 15 and names[0].endswith("test.npz[0]")
    top1 = 100.0 * float((probs.argmax(1).numpy() == yt).mean())
    assert top1 == pytest.approx(metrics["top1"])
    np.save(tmp_path / "rows.npy", xt[:2])
    assert predict_run(out, [str(tmp_path / "rows.npy")])[1].shape == (2, 3)


def test_predict_and_download_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["predict", str(tmp_path), "x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a finished ccar run" in err
    import ccar.data as data_mod

    def offline(name, root=None):
        raise DataError(f"{name}: download failed (no network); put the files in {root} yourself")

    monkeypatch.setattr(data_mod, "download_cifar", offline)
    assert main(["download", "cifar100", "--root", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ccar download: error: cifar100: download failed")


def test_a_cnn_on_features_is_a_clear_error(tmp_path):
    from ccar import ConfigError

    np.savez(tmp_path / "train.npz", X=np.ones((4, 3), np.float32), y=np.array([0, 0, 1, 1]))
    np.savez(tmp_path / "test.npz", X=np.ones((2, 3), np.float32), y=np.array([0, 1]))
    with pytest.raises(ConfigError, match="model.name=cnn is for images; features has 3 features per row: use model.name=mlp"):
        train(load_config(None, ["dataset=features", f"data_root={tmp_path}", "epochs=1", "model.name=cnn",
                                 f"out={tmp_path / 'r'}"]))


def test_streamed_augmentation_draws_a_new_crop_every_epoch_and_the_same_one_on_a_rerun(tmp_path):
    """The file loader's random-resized crop is seeded by (seed, image, epoch): not by the worker's torch seed, which
    persistent DataLoader workers keep across epochs (every epoch then saw the same crop of each image)."""
    import numpy as np
    from PIL import Image

    from ccar.data import ImageFileDataset, ImageFiles
    from ccar.data.sampling import ClassSampler, EpochSampler

    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    files = ImageFiles([path, path], np.array([0, 1]))
    data = ImageFileDataset(files, train=True, size=16, seed=3)
    sampler = EpochSampler(ClassSampler(torch.tensor([0, 1]), shuffle=False))
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append([data[i][0] for i in sampler])
    assert not torch.equal(epochs[0][0], epochs[1][0])  # image 0, epoch 0 vs epoch 1
    assert torch.equal(data[2][0], epochs[1][0])  # index N + 0 is image 0 at epoch 1, whoever computes it
    sampler.skip_next(1)
    assert list(sampler) == [3]  # a resumed epoch starts after the batches already trained
