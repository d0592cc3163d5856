"""Pretrained backbones and fine-tuning modes on tiny random models written with ``save_pretrained`` (as
``transformers`` tests itself): never a download."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ccar import ConfigError
from ccar.cli import main
from ccar.engine.config import load_config
from ccar.engine.evaluate_run import evaluate_run
from ccar.engine.train import train
from test_own_data import make_digit_folder, make_folder_tree

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test never reaches the hub
transformers = pytest.importorskip("transformers")
FAST = ["optim.batch_size=8", "optim.lr=0.05", "threads=1", "progress=false", "val_fraction=0"]


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=8)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.4, 0.4],
                                   image_std=[0.3, 0.3, 0.3]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_folder_tree(tmp_path_factory.mktemp("photos") / "p", split=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path / "cache"))


def run_args(photos, tiny_vit, out, *extra):
    return ["dataset=folder", f"data_root={photos}", f"model.name=hf:{tiny_vit}", f"out={out}", *FAST, *extra]


def backbone_state(tiny_vit):
    return {f"backbone.model.{k}": v for k, v in transformers.ViTModel.from_pretrained(tiny_vit).state_dict().items()}


@pytest.mark.parametrize("mode", ["linear", "bias", "lora"])
def test_finetune_modes_train_only_what_they_say(photos, tiny_vit, tmp_path, mode):
    out = tmp_path / mode
    metrics = train(load_config(None, run_args(photos, tiny_vit, out, "epochs=2", f"finetune={mode}")),
                    log=lambda *_: None)
    saved = load_file(out / "last.safetensors")  # only what the run trained: the base weights are named by config
    fc = {"fc.weight", "fc.bias"}
    if mode == "linear":  # (and the classifier's input statistics, model.feature_norm)
        assert set(saved) == fc | {"fc.input_norm.mean", "fc.input_norm.std"}
    elif mode == "bias":
        assert fc < set(saved) and all(k in fc or k.endswith(".bias") for k in saved)
    else:
        assert fc < set(saved) and all(k in fc or "lora_" in k for k in saved)
    from ccar.engine.build import dataset_from_config, model_from_config

    cfg = load_config(str(out / "config.yaml"))
    model = model_from_config(cfg, dataset_from_config(cfg))
    from ccar.engine.finetune import load_trained

    load_trained(model, saved, mode)
    base = backbone_state(tiny_vit)
    state = model.state_dict()
    for k, v in base.items():  # the pretrained weights themselves are untouched (LoRA wraps them as base_layer)
        module, param = k.rsplit(".", 1)
        key = k if k in state else f"{module}.base_layer.{param}"
        if mode == "bias" and k.endswith(".bias"):
            continue
        assert torch.equal(state[key], v), k
    if mode == "bias":
        assert any(not torch.equal(state[k], base[k]) for k in base if k.endswith(".bias"))
    assert evaluate_run(out, "last")["metrics"]["per_class"] == metrics["last"]["per_class"]
    assert predicted_per_class(out, photos, tmp_path / "p.csv", "last") == pytest.approx(metrics["last"]["per_class"])
    data = json.loads((out / "data.json").read_text())
    assert data["image_size"] == 16 and data["mean"] == [0.4, 0.4, 0.4] and data["input_shape"] == [3, 16, 16]


def predicted_per_class(run, photos, csv_path, which="best"):
    """Per-class accuracy of `ccar predict` over the photos' test folder."""
    import csv

    assert main(["predict", str(run), str(photos / "test"), "--which", which, "--out", str(csv_path)]) == 0
    rows = list(csv.DictReader(open(csv_path)))
    return [100.0 * np.mean([r["top1"] == n for r in rows if f"/test/{n}/" in r["input"]]) for n in ("ant", "bee", "cow")]


def test_pretrained_run_resumes_bit_identically_and_predicts_like_eval(photos, tiny_vit, tmp_path):
    opts = ("finetune=lora", "optim.schedule=constant", "optim.backbone_lr=0.01")
    train(load_config(None, run_args(photos, tiny_vit, tmp_path / "a", "epochs=2", *opts)), log=lambda *_: None)
    train(load_config(None, run_args(photos, tiny_vit, tmp_path / "b", "epochs=1", *opts)), log=lambda *_: None)
    train(load_config(None, run_args(photos, tiny_vit, tmp_path / "b", "epochs=2", *opts)), resume=True,
          log=lambda *_: None)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = evaluate_run(tmp_path / "a", "best")["metrics"]
    assert predicted_per_class(tmp_path / "a", photos, tmp_path / "p.csv") == pytest.approx(metrics["per_class"])
    crt = tmp_path / "crt"  # the second stage re-trains the classifier of the LoRA run
    assert main(["retrain", str(tmp_path / "a"), "method=crt", "epochs=1", f"out={crt}", "progress=false"]) == 0
    assert set(load_file(crt / "last.safetensors")) >= {"fc.weight", "fc.bias"}


def test_optimizer_gives_the_backbone_its_own_rate(photos, tiny_vit, tmp_path):
    from ccar.engine.build import dataset_from_config, model_from_config
    from ccar.engine.train import build_optimizer

    cfg = load_config(None, run_args(photos, tiny_vit, tmp_path / "x", "optim.backbone_lr=0.001", "optim.lr=0.1"))
    model = model_from_config(cfg, dataset_from_config(cfg))
    groups = build_optimizer(model, cfg.optim).param_groups
    head = {id(p) for p in model.fc.parameters()}
    scales = {g["lr_scale"] for g in groups if g["params"] and all(id(p) in head for p in g["params"])}
    others = {g["lr_scale"] for g in groups if g["params"] and not any(id(p) in head for p in g["params"])}
    assert scales == {1.0} and len(others) == 1 and others.pop() == pytest.approx(0.01)


def test_a_grey_fixed_size_dataset_runs_through_a_colour_backbone(tiny_vit, tmp_path):
    digits = make_digit_folder(tmp_path / "digits")
    out = tmp_path / "run"
    train(load_config(None, ["dataset=folder", f"data_root={digits}", f"model.name=hf:{tiny_vit}", "epochs=1",
                             "finetune=linear", f"out={out}", *FAST]), log=lambda *_: None)
    data = json.loads((out / "data.json").read_text())
    assert data["input_shape"] == [3, 16, 16]  # colour at the backbone's size: what it was pretrained on


def test_model_weights_start_from_a_ccar_run_with_a_new_classifier(tmp_path):
    digits = make_digit_folder(tmp_path / "digits")
    three = tmp_path / "three"
    train(load_config(None, ["dataset=folder", f"data_root={digits}", "model.name=cnn", "model.width=4", "epochs=1",
                             f"out={three}", *FAST]), log=lambda *_: None)
    two = make_digit_folder(tmp_path / "two", counts=(8, 4))
    from ccar.engine.build import dataset_from_config, model_from_config

    cfg = load_config(None, ["dataset=folder", f"data_root={two}", "model.name=cnn", "model.width=4",
                             f"model.weights={three / 'best.safetensors'}", "progress=false"])
    model = model_from_config(cfg, dataset_from_config(cfg))
    parent = load_file(three / "best.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in parent.items() if not k.startswith("fc."))
    assert state["fc.weight"].shape[0] == 2  # two classes here: the classifier starts afresh
    wide = load_config(None, ["dataset=folder", f"data_root={two}", "model.name=cnn", "model.width=8",
                              f"model.weights={three / 'best.safetensors'}", "progress=false"])
    with pytest.raises(ConfigError, match="does not fit model"):
        model_from_config(wide, dataset_from_config(wide))


def test_pretrained_errors_are_one_line(photos, tiny_vit, tmp_path, capsys):
    assert main(["train", *run_args(photos, tmp_path / "nowhere", tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot load it" in err and "HF_HUB_OFFLINE" in err
    bare = tmp_path / "bare"  # a model saved without its image processor
    transformers.ViTModel(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=16, image_size=16, patch_size=8)).save_pretrained(bare)
    assert main(["train", *run_args(photos, bare, tmp_path / "r2")]) == 2
    assert "has no image processor" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="finetune must be one of full, linear, bias, lora"):
        load_config(None, ["finetune=half"])
    with pytest.raises(ConfigError, match="lora.targets: no module named 'nope'"):
        train(load_config(None, run_args(photos, tiny_vit, tmp_path / "r3", "finetune=lora", "lora.targets=[nope]")))


def _no_backend(*args, **kwargs):
    raise ImportError("")  # what transformers 5.17 raises without torchvision, less its message


def test_preprocessing_is_read_without_building_an_image_processor(photos, tiny_vit, tmp_path, monkeypatch):
    """transformers 5.17's AutoImageProcessor refuses to run without torchvision, 5.25's falls back to PIL: size,
    mean and std come from the saved configuration, so no release's choice of backend can stop a run."""
    from ccar.models.pretrained import Preprocessing, hf_preprocessing

    try:
        monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", _no_backend)
    except ImportError:  # 5.17 without torchvision: the real one already refuses
        pass
    monkeypatch.setattr(transformers.ImageProcessingMixin, "__init__", _no_backend)
    hf_preprocessing.cache_clear()  # an earlier test's answer would hide the path under test
    out = tmp_path / "run"
    train(load_config(None, run_args(photos, tiny_vit, out, "epochs=1", "finetune=linear")), log=lambda *_: None)
    data = json.loads((out / "data.json").read_text())
    assert data["image_size"] == 16 and data["mean"] == [0.4, 0.4, 0.4] and data["std"] == [0.3, 0.3, 0.3]
    stats = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}
    for name, sizes, side in (("old", {"size": 24}, 24),  # a bare number, as older hub configurations say
                              ("crop", {"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 16}}, 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps({**sizes, **stats}))
        assert hf_preprocessing(str(tmp_path / name)) == Preprocessing(side, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    (tmp_path / "nostd").mkdir()
    (tmp_path / "nostd" / "preprocessor_config.json").write_text(json.dumps({"size": 24, "image_mean": [0.5] * 3}))
    with pytest.raises(ConfigError, match="gives no image_std; add them to its preprocessor_config.json"):
        hf_preprocessing(str(tmp_path / "nostd"))
    (tmp_path / "empty").mkdir()  # no model at all, as an uncached hub id offline: not "has no image processor"
    with pytest.raises(ConfigError, match="cannot load it"):
        hf_preprocessing(str(tmp_path / "empty"))


@pytest.mark.parametrize("error, shown", [
    (ImportError(""), "(ImportError with no message); install it"),
    (ImportError("\nViTModel requires the Torchvision library but it was not found in your environment."),
     "(ImportError: ViTModel requires the Torchvision library"),
    (ModuleNotFoundError("No module named 'timm'", name="timm"), "pip install timm")])
def test_a_missing_package_is_named_not_an_empty_reason(photos, tiny_vit, tmp_path, monkeypatch, capsys, error,
                                                        shown):
    def missing(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", missing)
    assert main(["train", *run_args(photos, tiny_vit, tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a package transformers needs for this model is missing" in err and shown in err


def test_a_tokenizer_without_its_package_is_not_called_missing(tmp_path, monkeypatch):
    from ccar.models.pretrained import text_classifier

    clip = tiny_clip(tmp_path / "clip")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _no_backend)
    with pytest.raises(ConfigError, match="a package transformers needs for this model is missing"):
        text_classifier(str(clip), ["ant", "bee"], "a {}.")


def test_a_sweep_of_head_methods_over_a_pretrained_backbone(photos, tiny_vit, tmp_path):
    import yaml

    from ccar.sweep import read_results, run_sweep

    spec = {"out": str(tmp_path / "sweep"), "seeds": [0],
            "base": {"dataset": "folder", "data_root": str(photos), "model.name": f"hf:{tiny_vit}", "epochs": 1,
                     "finetune": "linear", "optim.batch_size": 8, "threads": 1, "val_fraction": 0.3},
            "methods": {"CE": {"loss.name": "ce"}, "CCAR-LA": {"loss.name": "ccar", "loss.base": "la"}},
            "report": {"baselines": {}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    run_sweep(str(tmp_path / "s.yaml"), log=lambda *_: None)
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    assert {r["method"] for r in rows} == {"CE", "CCAR-LA"} and all(r["config"]["finetune"] == "linear" for r in rows)
    # the two methods share one frozen backbone: its features were computed once, into the sweep's runs folder
    assert len(list((tmp_path / "sweep" / "runs" / "features").glob("*.safetensors"))) == 1


def test_a_linear_probe_runs_its_backbone_in_evaluation_mode(tmp_path):
    """Fixed features under `linear` (and classifier re-training): no dropout in the frozen backbone; under `lora`
    dropout stays on and only BatchNorm statistics are frozen."""
    from ccar.engine.finetune import apply_finetune, set_train_modes
    from ccar.models import build_model

    folder = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=8, hidden_dropout_prob=0.5)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    x = torch.randn(4, 3, 16, 16)
    for mode, deterministic in (("linear", True), ("lora", False)):
        model = apply_finetune(build_model(f"hf:{folder}", 3, (3, 16, 16)), mode)
        model.train()
        set_train_modes(model, mode)
        assert model.fc.training and (not model.backbone.training) == deterministic
        torch.manual_seed(0)
        a = model(x)
        b = model(x)
        assert torch.equal(a, b) == deterministic
    cnn = build_model("cnn", 3, (1, 8, 8), width=2)
    cnn.train()
    set_train_modes(apply_finetune(cnn, "bias"), "bias")
    assert all(not m.training for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)) and cnn.training


def tiny_clip(folder):
    """A random CLIP (image and text towers) with a character-level tokenizer, saved as a hub model would be."""
    letters = "abcdefghijklmnopqrstuvwxyz."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)  # vocabulary files: the one tokenizer API 4.40 and 5.x share
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=12)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def test_a_text_initialised_head_starts_as_the_zero_shot_classifier(photos, tiny_vit, tmp_path):
    from ccar.engine.build import dataset_from_config, init_head_from_text, model_from_config

    clip = tiny_clip(tmp_path / "clip")
    cfg = load_config(None, run_args(photos, clip, tmp_path / "r", "head.init=text", "head.prompt=a {} here."))
    data = dataset_from_config(cfg)
    model = model_from_config(cfg, data)
    init_head_from_text(model, cfg, data)
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    full = transformers.CLIPModel.from_pretrained(clip).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(clip)([f"a {n} here." for n in data.class_names],
                                                              padding=True, return_tensors="pt")
    with torch.no_grad():
        zero_shot = full(pixel_values=x, **tokens).logits_per_image
        assert torch.allclose(model(x), zero_shot, atol=1e-5)
    assert data.class_names == ["ant", "bee", "cow"]
    metrics = train(load_config(None, run_args(photos, clip, tmp_path / "run", "head.init=text", "epochs=1",
                                               "finetune=linear")), log=lambda *_: None)
    assert len(metrics["per_class"]) == 3
    vit = load_config(None, run_args(photos, tiny_vit, tmp_path / "r2", "head.init=text"))
    with pytest.raises(ConfigError, match="needs a model with a text tower"):
        init_head_from_text(model_from_config(vit, data), vit, data)
    with pytest.raises(ConfigError, match="head.init must be random unless the model is a CLIP or SigLIP"):
        load_config(None, ["head.init=text", "model.name=cnn"])
    with pytest.raises(ConfigError, match="head.prompt must be a text with {}"):
        load_config(None, ["head.prompt=a photo", "model.name=hf:x", "head.init=text"])


class _TimmNet(torch.nn.Module):
    """What timm.create_model returns, in small: features, `num_features`, a classifier timm can leave out."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.num_features = 6
        self.head = torch.nn.Linear(6, num_classes) if num_classes else torch.nn.Identity()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    """timm does not import beside the CPU torch wheel here: a stand-in with the parts of timm's API that ccar
    calls (create_model with pretrained / num_classes / pretrained_cfg_overlay, models.get_pretrained_cfg) checks
    ccar's side of it. Like timm, it drops the classifier of a weight file for another class count."""
    import types

    def create_model(name, pretrained=False, num_classes=1000, pretrained_cfg_overlay=None):
        if name != "tiny_net":
            raise RuntimeError(f"Unknown model ({name})")
        model = _TimmNet(num_classes)
        if pretrained:
            file = (pretrained_cfg_overlay or {}).get("file")
            if file is None:
                raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
            state = {k: v for k, v in load_file(file).items() if not k.startswith("head.")}
            model.load_state_dict(state, strict=False)
        return model

    def get_pretrained_cfg(name):
        return types.SimpleNamespace(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) \
            if name == "tiny_net" else None

    timm = types.SimpleNamespace(create_model=create_model, models=types.SimpleNamespace(get_pretrained_cfg=get_pretrained_cfg))
    monkeypatch.setitem(__import__("sys").modules, "timm", timm)
    return timm


def test_timm_pretrained_weights_from_a_local_file(photos, tmp_path, fake_timm, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    weights = tmp_path / "tiny_net.safetensors"
    save_file(_TimmNet(1000).state_dict(), weights)  # an ImageNet checkpoint: 1000 classes
    args = ["dataset=folder", f"data_root={photos}", "model.name=timm:tiny_net", "model.pretrained=true",
            f"model.weights={weights}", "epochs=1", "finetune=linear", *FAST]
    metrics = train(load_config(None, args + [f"out={tmp_path / 'run'}"]), log=lambda *_: None)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["image_size"] == 16 and data["mean"] == [0.5, 0.5, 0.5] and data["std"] == [0.25, 0.25, 0.25]
    from ccar.engine.build import dataset_from_config, model_from_config

    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    model = model_from_config(cfg, dataset_from_config(cfg))
    file = load_file(weights)
    assert torch.equal(model.backbone.conv.weight, file["conv.weight"]) and model.fc.weight.shape == (3, 6)
    assert evaluate_run(tmp_path / "run", "last")["metrics"]["per_class"] == metrics["last"]["per_class"]
    offline = [a for a in args if not a.startswith("model.weights")] + [f"out={tmp_path / 'r2'}"]
    assert main(["train", *offline]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "timm cannot build it" in err and "model.weights=FILE" in err
    with pytest.raises(ConfigError, match="model.pretrained must be false unless model.name=timm"):
        load_config(None, ["model.pretrained=true", "model.name=cnn"])
    with pytest.raises(ConfigError, match="timm knows no pretrained weights of that name"):
        from ccar.models import timm_preprocessing

        timm_preprocessing("nope")
