"""The frozen-backbone fast path (the classifier trained on cached features) and class subsets of the synthetic
long tails."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ccar import ConfigError, DataError
from ccar.data import build_dataset
from ccar.engine.config import load_config
from ccar.engine.features import cache_key
from ccar.engine.retrain import retrain
from ccar.engine.train import train
from conftest import make_csv


def args(root, out, *extra):
    # A tabular set has no augmentation, so a run on cached features must equal the run through the backbone.
    return ["dataset=csv", f"data_root={root}", "model.name=mlp", "model.hidden=[8]", "epochs=3", "val_fraction=0.25",
            "optim.batch_size=16", "optim.lr=0.05", "threads=1", "progress=false", f"out={out}", *extra]


def run(root, out, *extra):
    lines = []
    metrics = train(load_config(None, args(root, out, *extra)), log=lines.append)
    return metrics, "\n".join(lines)


@pytest.fixture
def table(tmp_path):
    return make_csv(tmp_path / "csv", counts=(60, 20, 8))


def same_weights(a, b):
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_linear_probe_on_cached_features_equals_the_probe_through_the_backbone(table, tmp_path):
    common = ("finetune=linear", "loss.name=ccar", "loss.base=la", "tau_norm=auto", "sampler=class-balanced")
    through, _ = run(table, tmp_path / "through", *common, "cache_features=false")
    cached, log = run(table, tmp_path / "cached", *common)  # cache_features=auto: on for finetune=linear
    assert "features: the frozen backbone ran once" in log
    assert same_weights(tmp_path / "through" / "last.safetensors", tmp_path / "cached" / "last.safetensors")
    assert set(load_file(tmp_path / "cached" / "best.safetensors")) == {"fc.weight", "fc.bias", "fc.input_norm.mean",
                                                                         "fc.input_norm.std"}
    for key in ("per_class", "top1", "balanced", "tau_norm", "best_epoch"):
        assert cached[key] == pytest.approx(through[key]), key
    assert json.loads((tmp_path / "cached" / "data.json").read_text())["input_shape"] == [3]  # the data's, not 8
    from ccar.engine.evaluate_run import evaluate_run

    assert evaluate_run(tmp_path / "cached", "best")["metrics"]["per_class"] == pytest.approx(cached["per_class"])


def test_a_feature_cache_folder_is_shared_by_runs_over_the_same_backbone(table, tmp_path):
    cache = tmp_path / "features"
    first, log1 = run(table, tmp_path / "a", "finetune=linear", "loss.name=la", f"feature_cache={cache}")
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and "cached in" in log1
    second, log2 = run(table, tmp_path / "b", "finetune=linear", "loss.name=ce", f"feature_cache={cache}")
    assert "read from" in log2 and list(cache.glob("*.safetensors")) == files
    alone, _ = run(table, tmp_path / "c", "finetune=linear", "loss.name=ce")
    assert second["per_class"] == alone["per_class"]
    # The key follows what decides the features (split seed, weights) and ignores what only the head sees.
    key = lambda *extra: cache_key(load_config(None, args(table, tmp_path / "x", "finetune=linear", *extra)))  # noqa
    assert key("loss.name=ce") == key("loss.name=bs", "epochs=9", "optim.lr=0.3")
    assert key("seed=0") != key("seed=1")
    assert key() != key(f"model.weights={tmp_path / 'a' / 'best.safetensors'}")
    from safetensors.torch import save_file

    stale = load_file(files[0])
    stale["train_y"] = stale["train_y"].flip(0)  # the same settings over changed files: other labels, recomputed
    save_file(stale, files[0])
    _, log_stale = run(table, tmp_path / "e", "finetune=linear", "loss.name=la", f"feature_cache={cache}")
    assert "cached in" in log_stale
    files[0].write_bytes(b"cut short")  # a cache file a crash left half-written is computed again
    third, log3 = run(table, tmp_path / "d", "finetune=linear", "loss.name=la", f"feature_cache={cache}")
    assert "cached in" in log3 and third["per_class"] == first["per_class"]


def test_classifier_retraining_on_cached_features_equals_retraining_through_the_backbone(table, tmp_path):
    run(table, tmp_path / "parent", "loss.name=ce")
    stage = ["method=crt", "epochs=2", "progress=false", "threads=1"]
    a = retrain(tmp_path / "parent", stage + [f"out={tmp_path / 'a'}"], log=lambda *_: None)
    b = retrain(tmp_path / "parent", stage + [f"out={tmp_path / 'b'}", "cache_features=true"], log=lambda *_: None)
    assert same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert a["per_class"] == pytest.approx(b["per_class"])


def test_cache_features_is_refused_where_the_backbone_trains():
    with pytest.raises(ConfigError, match="cache_features must be true only for a frozen backbone"):
        load_config(None, ["cache_features=true"])
    with pytest.raises(ConfigError, match="cache_features must be auto, true or false"):
        load_config(None, ["cache_features=yes please"])
    assert load_config(None, ["cache_features=true", "finetune=linear"]).cache_features == "true"


def test_classes_picks_and_relabels_source_classes(idx_root):
    data = build_dataset("fashion-mnist-lt", str(idx_root), imbalance=1, val_fraction=0, classes=[7, 2, 5])
    assert data.num_classes == 3 and data.class_names == ["7", "2", "5"] and data.class_counts == [40, 40, 40]
    x, y = data.test
    # make_idx_dataset draws class c's images around brightness 25 c: the relabelled classes keep their images
    means = [float(x[y == k].float().mean()) for k in range(3)]
    assert np.allclose(means, [25 * 7 + 5.5, 25 * 2 + 5.5, 25 * 5 + 5.5], atol=1.5)
    tail = build_dataset("fashion-mnist-lt", str(idx_root), imbalance=10, val_fraction=0, classes=[5, 6, 7, 8, 9])
    assert tail.class_counts[0] == 40 and tail.class_counts[-1] == 4
    for bad in ([1, 1], [3], [4, 10]):
        with pytest.raises(DataError, match="classes must be 2 or more distinct source classes in 0..9"):
            build_dataset("fashion-mnist-lt", str(idx_root), classes=bad)


def test_classes_is_an_error_where_the_data_brings_its_own(table):
    with pytest.raises(DataError, match="classes= picks classes of a synthetic long tail"):
        build_dataset("csv", str(table), classes=[0, 1])


def test_a_probe_standardises_its_features_with_the_training_split_and_eval_and_predict_apply_them(tmp_path):
    """A random CNN's features are ~1e-3 in scale: on raw features the probe barely leaves the prior; standardised
    with the training split's statistics (kept in the weight files) it learns, and `ccar eval` reproduces it."""
    from conftest import make_idx_dataset

    from ccar.engine.evaluate_run import evaluate_run

    digits = make_idx_dataset(tmp_path / "digits", n_per_class=(60,) * 10, test_per_class=10)
    args = ["dataset=mnist-lt", f"data_root={digits}", "imbalance=10", "epochs=4", "model.name=cnn",
            "model.width=4", "finetune=linear", "loss.name=ce", "threads=1", "progress=false"]
    logs = []
    std = train(load_config(None, args + [f"out={tmp_path / 'std'}"]), log=logs.append)
    raw = train(load_config(None, args + [f"out={tmp_path / 'raw'}", "model.feature_norm=none"]), log=lambda *_: None)
    assert any("standardised with the training split's statistics" in line for line in logs)
    assert std["balanced"] > raw["balanced"] + 20, (std["balanced"], raw["balanced"])
    weights = load_file(tmp_path / "std" / "best.safetensors")
    assert float(weights["fc.input_norm.std"].max()) < 0.1  # the statistics of the features' own, small scale
    again = evaluate_run(tmp_path / "std", "best")["metrics"]
    assert again["balanced"] == pytest.approx(std["balanced"])
    assert set(load_file(tmp_path / "raw" / "best.safetensors")) == {"fc.weight", "fc.bias"}
