"""End-to-end training, evaluation and resume on generated data; configs; metrics; the CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ccar import ConfigError, TrainingError
from ccar.cli import main
from ccar.engine import checkpoint as ckpt
from ccar.engine.config import TrainConfig, apply_overrides, load_config
from ccar.metrics import classification_metrics, expected_calibration_error, rank_thirds
from ccar.engine.train import train
from conftest import make_csv, make_idx_dataset, make_image_tree

FAST = ["model.width=4", "optim.batch_size=32", "optim.lr=0.05", "threads=1", "progress=false"]


def cfg_for(root, out, *extra, epochs=3):
    return load_config(None, ["dataset=mnist-lt", f"data_root={root}", "imbalance=10", f"epochs={epochs}",
                              f"out={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(60,) * 10, test_per_class=10)


def test_train_writes_a_complete_run_folder(digits, tmp_path):
    metrics = train(cfg_for(digits, tmp_path / "run"), log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "log.jsonl", "checkpoint.safetensors", "best.safetensors",
                 "last.safetensors", "per_class.png", "omega.png", "curves.png", "confusion.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("top1", "per_class", "many", "medium", "few", "groups", "val_top1", "epochs", "seconds",
                "test_agnostic", "test_agnostic_oracle", "confusion_groups"):
        assert key in saved
    assert saved["test_agnostic"]["uniform"] == pytest.approx(saved["balanced"])  # uniform = balanced accuracy
    assert len(saved["best"]["confusion"]) == 10 and sum(map(sum, saved["best"]["confusion"])) == saved["best"]["n"]
    assert saved["epochs"] == 3 and len((run / "log.jsonl").read_text().splitlines()) == 3
    assert saved["top1"] > 30  # 10 classes separable by brightness: far above chance
    assert metrics["best"]["top1"] == saved["top1"]
    assert load_config(str(run / "config.yaml")).loss.base == "la"


def test_same_seed_same_bits(digits, tmp_path):
    a = train(cfg_for(digits, tmp_path / "a"), log=lambda *_: None)
    b = train(cfg_for(digits, tmp_path / "b"), log=lambda *_: None)
    assert a["best"] == b["best"] and a["last"] == b["last"]
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_then_resumed_equals_uninterrupted(digits, tmp_path, monkeypatch):
    full = train(cfg_for(digits, tmp_path / "full", epochs=4), log=lambda *_: None)
    real_save, calls = ckpt.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed right after the second epoch's checkpoint

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(digits, tmp_path / "cut", epochs=4), log=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg_for(digits, tmp_path / "cut", epochs=4), log=lambda *_: None)
    resumed = train(cfg_for(digits, tmp_path / "cut", epochs=4), resume=True, log=lambda *_: None)
    assert resumed["best"] == full["best"] and resumed["last"] == full["last"]
    wa, wb = load_file(tmp_path / "full" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("loss", [["loss.name=ce"], ["loss.name=ldam", "loss.drw_epoch=1"], ["loss.name=ccar", "loss.base=bs", "loss.detach_weight=true"], ["loss.name=cb-focal", "loss.beta=0.99"]])
def test_every_loss_trains_from_the_config(digits, tmp_path, loss):
    metrics = train(cfg_for(digits, tmp_path / "r", *loss, epochs=2), log=lambda *_: None)
    assert metrics["top1"] is not None and metrics["epochs"] == 2


def test_tabular_csv_with_mlp(tmp_path):
    root = make_csv(tmp_path / "csv", counts=(80, 20, 6))
    cfg = load_config(None, ["dataset=csv", f"data_root={root}", "model.name=mlp", "model.hidden=[16]", "epochs=3",
                             f"out={tmp_path / 'r'}", "optim.batch_size=16", "progress=false", "val_fraction=0.2"])
    metrics = train(cfg, log=lambda *_: None)
    assert metrics["top1"] > 50


def test_file_backed_dataset_streams_through_a_dataloader(tmp_path):
    root = make_image_tree(tmp_path / "imgs", counts=(8, 4, 2), size=20)
    cfg = load_config(None, ["dataset=imagenet-lt", f"data_root={root}", "model.width=4", "epochs=1", "workers=0",
                             "image_size=16", f"out={tmp_path / 'r'}", "optim.batch_size=4", "progress=false"])
    metrics = train(cfg, log=lambda *_: None)
    assert metrics["epochs"] == 1 and len(metrics["per_class"]) == 3


def test_nonfinite_loss_names_the_step_and_keeps_the_checkpoint(digits, tmp_path):
    cfg = cfg_for(digits, tmp_path / "nan", "optim.lr=1e30", "loss.name=ce", "optim.warmup_epochs=0", epochs=2)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 1, step \d+; likely cause: a learning rate"):
        train(cfg, log=lambda *_: None)


def test_unwritable_output_fails_before_training(digits, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="not writable"):
        train(cfg_for(digits, blocker / "run"), log=lambda *_: None)


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_default_job_and_yaml_matches():
    cfg = TrainConfig()
    assert (cfg.dataset, cfg.loss.name, cfg.loss.base) == ("fashion-mnist-lt", "ccar", "la")
    assert load_config("configs/default.yaml") == cfg


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'; valid keys of optim: name, lr"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; valid keys: dataset"):
        load_config(None, ["epoch=3"])
    with pytest.raises(ConfigError, match="epochs: expected an integer, got 'ten'"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, ["loss.detach_weight=maybe"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")
    assert load_config(None, ["optim.lr=1", "optim.milestones=[3, 4]"]).optim.lr == 1.0


@pytest.mark.parametrize("word", ["off", "on", "no", "yes", "Off", "NO", "none", "null"])
def test_string_keys_take_yaml11_words_as_text(word, tmp_path):
    """YAML 1.1 reads off/on/no/yes as booleans and null as None; a string key takes the word as written, from the
    command line and from a file (an Optional key keeps null as None); boolean keys still accept the YAML 1.1 words."""
    cfg = apply_overrides(TrainConfig(), [f"amp={word}", f"loss.normalize={word}"])
    assert cfg.amp == word
    assert cfg.loss.normalize == (None if word == "null" else word)
    (tmp_path / "c.yaml").write_text(f"sampler: {word}\n")
    with pytest.raises(ConfigError, match=f"sampler must be one of instance, .*, got '{word}'"):
        load_config(str(tmp_path / "c.yaml"))
    if word.lower() in ("off", "on", "no", "yes"):
        assert load_config(None, [f"resident={word}"]).resident is (word.lower() in ("on", "yes"))


def test_compile_takes_its_four_modes_and_the_booleans_of_older_configs(tmp_path):
    assert load_config(None, []).compile == "auto"
    (tmp_path / "c.yaml").write_text("compile: true\n")  # (a bool key once: true/false files keep their meaning)
    assert load_config(str(tmp_path / "c.yaml")).compile == "true"
    assert load_config(None, ["compile=false"]).compile == "false" and load_config(None, ["compile=graph"])
    with pytest.raises(ConfigError, match="compile must be auto .*, got 'yes'"):
        load_config(None, ["compile=yes"])


def test_amp_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    import torch

    from ccar.engine.runtime import amp_dtype, native_bf16_cpu

    cpu = torch.device("cpu")
    monkeypatch.setenv("CCAR_NATIVE_BF16", "1")
    assert native_bf16_cpu() and amp_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setenv("CCAR_NATIVE_BF16", "0")
    assert not native_bf16_cpu() and amp_dtype("auto", cpu) is None
    assert amp_dtype("off", cpu) is None and amp_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.delenv("CCAR_NATIVE_BF16")  # what oneDNN reports (False on this project's AVX2 CPU)
    assert native_bf16_cpu() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_amp_off_from_the_command_line():
    assert load_config(None, ["amp=off"]).amp == "off"
    assert load_config(None, ["channels_last=false", "compile=true"]).channels_last == "false"


@pytest.mark.parametrize("override,message", [
    ("epochs=-3", "epochs must be an integer >= 1, got -3"),
    ("epochs=0", "epochs must be an integer >= 1"),
    ("optim.batch_size=0", "optim.batch_size must be an integer >= 1"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=-0.1", "optim.lr must be a number > 0"),
    ("val_fraction=1", r"val_fraction must be a fraction in \[0, 1\)"),
    ("val_fraction=-0.1", "val_fraction must be a fraction"),
    ("imbalance=0.5", "imbalance must be a number >= 1"),
    ("workers=-1", "workers must be an integer >= 0"),
    ("optim.warmup_epochs=20", r"optim.warmup_epochs must be an integer in 0..epochs \(15\)"),
    ("optim.schedule=multistep", r"optim.milestones must be epochs within 1..epochs \(15\)"),
    ("loss.drw_epoch=15", r"loss.drw_epoch must be an epoch in 0..14"),
    ("seed=-1", "seed must be an integer in 0.."),
    ("amp=false", "amp must be one of auto, bf16, fp16, off, got 'false'"),
    ("amp=null", "amp must be one of auto, bf16, fp16, off, got 'null'"),
    ("optim.momentum=1", r"optim.momentum must be a number in \[0, 1\)"),
    ("n_max=0", "n_max must be an integer >= 1"),
    ("model.hidden=[64, 0]", r"model.hidden must be a list of layer sizes >= 1 \(\[\] is a linear model\)"),
])
def test_out_of_range_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_in_range_edges_are_accepted():
    cfg = load_config(None, ["epochs=1", "optim.warmup_epochs=1", "val_fraction=0", "imbalance=1", "workers=0",
                             "optim.schedule=multistep", "optim.milestones=[1]", "loss.drw_epoch=0"])
    assert cfg.epochs == 1 and cfg.optim.milestones == [1]
    with pytest.raises(ConfigError, match="epochs must be"):
        train(TrainConfig(epochs=0))  # configs built in code are checked too


def test_yaml_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "dup.yaml").write_text("epochs: 3\noptim:\n  lr: 0.1\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml, line 4: invalid YAML \(duplicate key 'lr'"):
        load_config(str(tmp_path / "dup.yaml"))  # PyYAML alone keeps the last value silently
    (tmp_path / "merge.yaml").write_text("a: &o {lr: 0.1}\noptim:\n  <<: *o\n  lr: 0.5\n")
    from ccar.engine.config import load_yaml
    assert load_yaml(str(tmp_path / "merge.yaml"))["optim"] == {"lr": 0.5}  # a merge key's override is not a duplicate
    (tmp_path / "latin1.yaml").write_bytes(b"epochs: 3 # caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(tmp_path / "latin1.yaml"))


# --- metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_computed_confusion_matrix():
    # 3 classes, counts: class 0 many (500), class 1 medium (50), class 2 few (5).
    # Confusion (rows = truth): [[4, 0, 0], [1, 2, 1], [0, 2, 0]]
    truth = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 1, 1])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 5
    m = classification_metrics(logits, truth, [500, 50, 5])
    assert m["top1"] == pytest.approx(60.0)
    assert m["per_class"] == [100.0, 50.0, 0.0]
    assert (m["many"], m["medium"], m["few"]) == (100.0, 50.0, 0.0)
    assert m["balanced"] == pytest.approx(50.0)
    assert m["groups"] == {"head": 100.0, "middle": 50.0, "tail": 0.0}
    conf = torch.softmax(logits, 1).max(1).values[0].item()
    assert m["ece"] == pytest.approx(100 * abs(0.6 - conf), abs=1e-4)


def test_per_class_accuracy_equals_each_class_masked_mean():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(3000, 37, generator=g), torch.randint(0, 36, (3000,), generator=g)  # class 36 absent
    correct = (logits.argmax(1) == t).double()
    want = [100.0 * correct[t == c].mean().item() if (t == c).any() else None for c in range(37)]
    assert classification_metrics(logits, t, [5] * 37)["per_class"] == want


def test_rank_thirds_and_empty_groups():
    assert rank_thirds([5, 100, 50, 1000]) == {"head": [1, 3], "middle": [2], "tail": [0]}
    m = classification_metrics(torch.eye(2), torch.tensor([0, 1]), [500, 400])
    assert m["medium"] is None and m["few"] is None and m["many"] == 100.0
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["train", "nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ccar train: error: unknown config key 'nope'")
    assert main(["train", "dataset=mnist-lt", "data_root=/does/not/exist", "progress=false", f"out={tmp_path / 'x'}"]) == 2
    assert "no IDX files" in capsys.readouterr().err
    assert main(["eval", "/does/not/exist"]) == 2


def test_cli_train_then_eval_with_posthoc(digits, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "dataset=mnist-lt", f"data_root={digits}", "imbalance=10", "epochs=1", f"out={out}", *FAST]
    assert main(args) == 0
    assert "best-on-val" in capsys.readouterr().out
    assert main(["eval", str(out), "posthoc_tau=1.0"]) == 0
    text = capsys.readouterr().out
    assert "+LA τ=1" in text and (out / "eval-best-posthoc1.json").is_file()
    assert main(["eval", str(out), "--which", "last"]) == 0
    plain = json.loads((out / "eval-last.json").read_text())
    assert plain["top1"] == json.loads((out / "metrics.json").read_text())["last"]["top1"]


def test_rerunning_without_out_gets_a_fresh_folder(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["dataset=mnist-lt", f"data_root={digits}", "imbalance=10", "epochs=1", *FAST]
    train(load_config(None, args), log=lambda *_: None)
    cfg = load_config(None, args)
    train(cfg, log=lambda *_: None)
    assert cfg.out == str(Path("runs") / "mnist-lt-ccar-la-s0-2")
    assert (tmp_path / "runs" / "mnist-lt-ccar-la-s0" / "metrics.json").is_file()
    assert (tmp_path / cfg.out / "metrics.json").is_file()


def test_ldam_is_evaluated_in_its_training_scale():
    # LDAM trains on 30 * cosine: test probabilities must come from the scaled logits, or ECE is meaningless.
    from types import SimpleNamespace

    from ccar.data import DeviceLoader
    from ccar.engine.distributed import DistContext
    from ccar.engine.run import Run
    from ccar.engine.runtime import Precision
    from ccar.engine.scoring import eval_logit_scale, evaluate_split

    assert eval_logit_scale(load_config(None, ["loss.name=ldam"])) == 30.0
    assert eval_logit_scale(load_config(None, ["loss.name=ccar", "loss.base=ldam", "loss.scale=16"])) == 16.0
    assert eval_logit_scale(load_config(None, ["loss.name=la"])) == 1.0

    class Cosine(torch.nn.Module):  # always right, cosine 0.9 for the true class and -0.2 elsewhere
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 2).float() * 1.1 - 0.2

    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])

    def scores(loss):  # the run of a model trained with `loss`, scored on (x, y)
        run = Run(load_config(None, [f"loss.name={loss}"]), SimpleNamespace(class_counts=[10, 5]), Cosine(),
                  torch.device("cpu"), Precision(None, "test"), DistContext(),
                  lambda split: DeviceLoader(*split, 2, shuffle=False), lambda t: t)
        return evaluate_split(run, (x, y))

    raw, scaled = scores("la"), scores("ldam")
    assert raw["top1"] == scaled["top1"] == 100.0
    assert raw["ece"] > 20 and scaled["ece"] < 1e-6


def test_test_agnostic_scores_equal_hand_computed_values():
    """SADE's shifted test distributions, by importance weighting of per-class accuracy, and the oracle (post-hoc
    logit adjustment to the known test prior) on a 3-sample example worked out by hand."""
    from ccar.metrics import shifted_prior

    q = shifted_prior([7, 900, 40, 100], 8)  # ranks 3, 0, 2, 1: q ∝ 8^(-rank/3)
    assert torch.allclose(q, torch.tensor([0.125, 1, 0.25, 0.5], dtype=torch.float64) / 1.875)
    logits = torch.tensor([[3.0, 0, 0], [1, 0, -5], [0, 0, -1]])
    m = classification_metrics(logits, torch.tensor([0, 1, 2]), [100, 10, 1])
    assert m["per_class"] == [100.0, 0.0, 0.0]  # argmax 0, 0, 0 (a tie goes to the first class)
    # forward-2: q ∝ 2^(-[0, .5, 1]) -> 100 * 1 / (1 + 2^-0.5 + 0.5); backward-2: 100 * 0.5 / (the same sum)
    assert m["test_agnostic"]["forward-2"] == pytest.approx(100 / (1.5 + 2 ** -0.5))
    assert m["test_agnostic"]["backward-2"] == pytest.approx(50 / (1.5 + 2 ** -0.5))
    assert m["test_agnostic"]["uniform"] == pytest.approx(100 / 3)
    # oracle, uniform prior: z_c + log(1/3) - log(n_c / 111) adds (-0.994, 1.308, 3.611): predictions 2, 1, 2
    assert m["test_agnostic_oracle"]["uniform"] == pytest.approx(200 / 3)
    assert m["confusion_groups"]["tail"] == {"head": 100.0, "middle": 0.0, "tail": 0.0}
