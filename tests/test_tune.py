"""``ccar tune`` end to end on tiny generated data (a table, image folders, feature files, a frozen pretrained
backbone): the leaderboard, the winner's folder that ``ccar predict`` and ``ccar eval`` read, the budget, a resumed
study, the test split scored once and only after the winner is fixed, bad input as one-line errors; and class names
from a file."""

import csv
import json
import os
import time

import numpy as np
import pytest

from ccar.cli import main
from ccar.data import build_dataset
from ccar.data.class_names import read_class_names
from ccar.errors import DataError
from conftest import make_csv
from test_own_data import make_folder_tree

optuna = pytest.importorskip("optuna")
from ccar.tune import run_tune  # noqa: E402

TABLE = ["dataset=csv", "model.name=mlp", "model.hidden=[8]", "epochs=3", "optim.batch_size=16", "threads=1",
         "val_fraction=0.3"]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CCAR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def table(tmp_path):
    return make_csv(tmp_path / "table", counts=(60, 20, 8))


@pytest.fixture
def test_reads(monkeypatch):
    """Every scoring of a split, recorded as (is it the test split, was the winner fixed then); and
    ``ccar train``'s test evaluation (finish) made an error, as trials must never reach it."""
    import ccar.engine.scoring as scoring
    import ccar.tune.command as command

    log, fixed, real = [], [False], scoring.evaluate_split

    def spy(run, split, shifts=True):
        log.append((split is run.data.test, fixed[0]))
        return real(run, split, shifts)

    for module in ("ccar.engine.scoring", "ccar.engine.trainer", "ccar.tune.validation", "ccar.tune.monitor"):
        monkeypatch.setattr(f"{module}.evaluate_split", spy)
    real_confirm = command.confirm

    def confirm(*args, **kwargs):
        result = real_confirm(*args, **kwargs)
        fixed[0] = True  # the winner is chosen: only now may the test split be read
        return result

    monkeypatch.setattr(command, "confirm", confirm)
    monkeypatch.setattr("ccar.engine.finish.finish", lambda *a, **k: pytest.fail("a trial scored the test split"))
    return log


def test_tune_a_table_end_to_end(table, tmp_path, test_reads):
    out = tmp_path / "tune"
    summary = run_tune(None, TABLE + [f"data_root={table}", "budget=2m", "trials=12", "seeds=2", f"out={out}"], **QUIET)
    # the test split: read exactly once, after the winner was fixed; every other scoring was on validation
    assert [r for r in test_reads if r[0]] == [(True, True)] and len(test_reads) > 20
    names = {r["method"] for r in summary["leaderboard"]}
    assert {"CE", "LA", "CCAR-LA", "cRT", "tau-norm", "post-hoc-LA", "CB-RS", "SQRT-RS", "BS", "MiSLAS"} == names
    assert summary["trials"] == 12 and summary["winner"]["method"] in names
    top = summary["seeds"]["rows"]
    assert len(top) == 2 and all(r["n"] == 2 for r in top) and summary["seeds"]["comparisons"][0]["n"] == 2
    for f in ("leaderboard.md", "leaderboard.csv", "trials.csv", "search.png", "tune.json", "study.db"):
        assert (out / f).is_file(), f
    board = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert board[0]["method"] == max(summary["leaderboard"], key=lambda r: r["best val"] or -1)["method"]
    assert set(summary["test"]["per_class"]) == {"cat", "dog", "emu"}
    # one CE first stage serves CE, tau-norm and post-hoc LA: their default trials trained nothing themselves
    trials = list(csv.DictReader(open(out / "trials.csv")))
    assert [t["trained_epochs"] for t in trials[1:3]] == ["0", "0"] and trials[0]["model_dir"] == trials[1]["model_dir"]
    # the winner's folder is an ordinary run: ccar predict and ccar eval take it
    assert main(["predict", str(out / "winner"), str(table / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 15 and {r["top1"] for r in rows} <= {"cat", "dog", "emu"}
    assert main(["eval", str(out / "winner")]) == 0


def test_a_rerun_resumes_the_study_without_redoing_trials(table, tmp_path, monkeypatch):
    import ccar.tune.trial as trial

    args = TABLE + [f"data_root={table}", "budget=2m", "candidates=CE,LA,CB-RS", "seeds=1", f"out={tmp_path / 't'}"]
    first = run_tune(None, args + ["trials=4"], **QUIET)
    trained_before = {p.parent.name for p in (tmp_path / "t" / "runs").glob("*/validation.json")}
    prepared, real = [], trial.prepare
    monkeypatch.setattr(trial, "prepare", lambda cfg, **kw: prepared.append(cfg.out) or real(cfg, **kw))
    second = run_tune(None, args + ["trials=7"], **QUIET)
    assert first["trials"] == 4 and second["trials"] == 7
    assert not {os.path.basename(p) for p in prepared} & trained_before  # finished runs were not trained again
    study = optuna.load_study(study_name=second["study"], storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    assert [t.number for t in study.trials] == list(range(7))


def test_an_interrupted_trial_runs_first_in_the_next_session_from_its_checkpoint(table, tmp_path, monkeypatch):
    import ccar.tune.monitor as monitor
    import ccar.tune.trial as trial

    args = TABLE + [f"data_root={table}", "budget=2m", "candidates=CE,LA", "seeds=1", "trials=3",
                    f"out={tmp_path / 't'}", "epochs=4"]
    real_end = monitor.TrialMonitor.on_epoch_end

    def interrupt(self, trainer, record):
        real_end(self, trainer, record)
        if trainer.run.cfg.loss.name == "la" and record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor.TrialMonitor, "on_epoch_end", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_tune(None, args, **QUIET)
    monkeypatch.setattr(monitor.TrialMonitor, "on_epoch_end", real_end)
    resumed, real = [], trial.prepare
    monkeypatch.setattr(trial, "prepare", lambda cfg, resume=False, **kw: resumed.append((cfg.loss.name, resume))
                        or real(cfg, resume=resume, **kw))
    run_tune(None, args, **QUIET)
    assert resumed[0] == ("la", True)  # the LA trial again, first, continuing its run folder's checkpoint
    trials = list(csv.DictReader(open(tmp_path / "t" / "trials.csv")))
    assert [t["status"] for t in trials] == ["complete", "interrupted", "complete", "complete"]  # (trials=3 finished)
    assert trials[1]["knobs"] == trials[2]["knobs"] and trials[2]["method"] == "LA"


def test_a_small_search_space_is_searched_to_the_end(table, tmp_path):
    summary = run_tune(None, TABLE + [f"data_root={table}", "budget=2m", "candidates=CE,CB-RS", "seeds=1",
                                      "pruner=none", f"out={tmp_path / 't'}"], **QUIET)
    assert summary["stopped"].startswith("every setting of every candidate has been tried")
    assert sum(r["settings"] for r in summary["leaderboard"]) == 6  # 3 learning rates each
    # TPE returns to settings already tried; each time, the next trial is one not yet tried: few wasted trials
    assert summary["trials"] <= 12 and summary["spent_seconds"] < 60


def test_a_failing_candidate_is_recorded_and_the_search_goes_on(table, tmp_path, monkeypatch):
    import ccar.tune.trial as trial
    from ccar.errors import TrainingError

    real = trial.prepare

    def prepare(cfg, **kw):
        if cfg.loss.name == "la":
            raise TrainingError("non-finite loss at epoch 1 (lr too high?)")
        return real(cfg, **kw)

    monkeypatch.setattr(trial, "prepare", prepare)
    summary = run_tune(None, TABLE + [f"data_root={table}", "budget=2m", "candidates=CE,LA", "seeds=1", "trials=3",
                                      f"out={tmp_path / 't'}"], **QUIET)
    rows = list(csv.DictReader(open(tmp_path / "t" / "trials.csv")))
    assert rows[1]["method"] == "LA" and rows[1]["status"].startswith("failed: non-finite loss")
    assert summary["winner"]["method"] == "CE"


def test_the_budget_is_honoured_and_a_running_trial_stops_at_the_deadline(table, tmp_path):
    from ccar.tune.candidates import load_methods
    from ccar.tune.command import base_config
    from ccar.tune.options import split_overrides
    from ccar.tune.plan import plan_trial
    from ccar.tune.trial import run_plan

    started = time.monotonic()
    summary = run_tune(None, TABLE + [f"data_root={table}", "epochs=30", "budget=6s", f"out={tmp_path / 't'}"], **QUIET)
    elapsed = time.monotonic() - started
    # the search and the seed re-runs within the budget; then the winner's test evaluation and the reports (slack 8 s)
    assert summary["spent_seconds"] <= 6 + 1.5 and elapsed <= 6 + 8
    options, rest = split_overrides(TABLE + [f"data_root={table}", "epochs=30", f"out={tmp_path / 'd'}"])
    cfg = base_config(None, options, rest)
    methods, _ = load_methods(cfg.epochs, False, ["LA"])
    plan = plan_trial(cfg, methods["LA"], methods["LA"].default(), tmp_path / "d" / "runs")
    result = run_plan(plan, tmp_path / "d" / "runs", None, deadline=time.monotonic() + 0.05)
    assert result.status == "deadline" and result.metrics is None and result.epochs < 30
    assert (plan.first_dir / "checkpoint.safetensors").is_file()  # a later trial continues it


@pytest.mark.parametrize("item, message", [
    ("objective=median", "unknown objective 'median'"),
    ("candidates=CE,FancyLoss", "unknown candidate 'FancyLoss'"),
    ("budget=0", "budget must be more than zero"),
    ("budget=soon", "budget must be a duration"),
    ("objective=[1,2]", "the prior has 2 class weights but the data has 3 classes"),
    ("val_fraction=0", "val_fraction must be > 0"),
])
def test_bad_input_is_a_one_line_error(table, tmp_path, capsys, item, message):
    assert main(["tune", *TABLE, f"data_root={table}", f"out={tmp_path / 't'}", item]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("ccar tune: error:")


def test_folders_with_class_names_and_the_worst_class_objective(tmp_path, test_reads):
    photos = make_folder_tree(tmp_path / "photos", split=True)
    (photos / "classes.json").write_text(json.dumps({"ant": "formica", "bee": "apis", "cow": "bos", "elk": "alces"}))
    out = tmp_path / "t"
    summary = run_tune(None, ["dataset=folder", f"data_root={photos}", "image_size=16", "model.width=4", "epochs=2",
                              "optim.batch_size=8", "threads=1", "val_fraction=0.3", "budget=2m", "trials=4",
                              "seeds=1", "candidates=CE,cRT,CB-RS", "objective=worst-class", f"out={out}"], **QUIET)
    assert [r for r in test_reads if r[0]] == [(True, True)]
    assert set(summary["test"]["per_class"]) == {"formica", "apis", "bos"}
    assert json.loads((out / "winner" / "data.json").read_text())["class_names"] == ["formica", "apis", "bos"]
    assert main(["predict", str(out / "winner"), str(photos / "test"), "--out", str(tmp_path / "p.csv")]) == 0
    assert {r["top1"] for r in csv.DictReader(open(tmp_path / "p.csv"))} <= {"formica", "apis", "bos"}


def test_feature_files_with_a_prior_objective(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "feats"
    root.mkdir()
    for split, per in (("train", (50, 15, 6)), ("test", (6, 6, 6))):
        y = np.concatenate([np.full(n, c) for c, n in enumerate(per)]).astype(np.int64)
        np.savez(root / f"{split}.npz", X=(rng.normal(0, 1, (len(y), 4)) + y[:, None]).astype(np.float32), y=y)
    summary = run_tune(None, ["dataset=features", f"data_root={root}", "model.name=mlp", "model.hidden=[]",
                              "epochs=3", "optim.batch_size=16", "threads=1", "val_fraction=0.3", "budget=2m",
                              "trials=5", "seeds=1", "objective=[1,1,4]", f"out={tmp_path / 't'}"], **QUIET)
    assert summary["options"]["objective"] == "prior [1, 1, 4]" and summary["winner"] is not None
    pc = list(summary["test"]["per_class"].values())
    assert summary["test"]["objective"] == pytest.approx((pc[0] + pc[1] + 4 * pc[2]) / 6)


def test_a_frozen_pretrained_backbone_searches_every_head_method(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path / "vit"
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, image_size=16, patch_size=8)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    photos = make_folder_tree(tmp_path / "photos", split=True)
    out = tmp_path / "t"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_tune(None, ["dataset=folder", f"data_root={photos}", f"model.name=hf:{folder}", "finetune=linear",
                              "epochs=2", "optim.batch_size=8", "threads=1", "val_fraction=0.3", "budget=2m",
                              "trials=16", "seeds=1", f"out={out}"], **QUIET)
    names = {r["method"] for r in summary["leaderboard"]}
    assert {"LWS", "NCM", "Focal", "CB", "LDAM-DRW", "VS", "CCAR-CE", "cRT", "tau-norm"} <= names
    assert "MiSLAS" not in names and summary["winner"] is not None
    assert len(list((out / "features").glob("*.safetensors"))) == 1  # the backbone ran once for every trial
    assert main(["predict", str(out / "winner"), str(photos / "test"), "--out", str(tmp_path / "p.csv")]) == 0


def test_defaults_are_the_committed_studies_methods():
    """The default candidates are the studies' own definitions (configs/sweeps), not a parallel list."""
    from pathlib import Path

    from ccar.sweep import load_sweep
    from ccar.tune.candidates import load_methods

    root = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    studies = {**load_sweep(str(root / "fashion-mnist-lt-recipes.yaml"))["methods"],
               **load_sweep(str(root / "fashion-mnist-lt-tails.yaml"))["methods"]}
    ours, _ = load_methods(12, False)
    for name in ("CE", "LA", "BS", "CCAR-LA", "CB-RS", "SQRT-RS", "cRT", "tau-norm", "MiSLAS"):
        theirs = {k: v for k, v in studies[name].items() if k not in ("tune", "stage2")}
        assert ours[name].fixed == theirs, name
        assert (ours[name].stage2 or {}).get("method") == (studies[name].get("stage2") or {}).get("method"), name


def test_class_names_files(tmp_path):
    listed = tmp_path / "classes.txt"
    listed.write_text("ankle boot\nbag\n\n")
    assert read_class_names(listed, ["0", "1"]) == ["ankle boot", "bag"]
    synsets = tmp_path / "synsets.txt"  # ImageNet's LOC_synset_mapping.txt: 'wnid name, other names'; extra keys ok
    synsets.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\nn01484850 great white shark\n")
    assert read_class_names(synsets, ["n01443537", "n01440764"]) == ["goldfish", "tench, Tinca tinca"]
    for text, current, message in (("a\nb\nc\n", ["0", "1"], "3 names for 2 classes"),
                                   ("a\na\n", ["0", "1"], "given to two classes"),
                                   ('{"x": "y"}', ["x", "z"], "no name for class 'z'")):
        path = tmp_path / ("c.json" if text.startswith("{") else "c.txt")
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_class_names(path, current)
    table = make_csv(tmp_path / "table")
    (tmp_path / "names.json").write_text(json.dumps(["Felis", "Canis", "Dromaius"]))
    data = build_dataset("csv", str(table), class_names=str(tmp_path / "names.json"))
    assert data.class_names == ["Felis", "Canis", "Dromaius"] and "class names from" in data.note
    with pytest.raises(DataError, match="is not a file"):
        build_dataset("csv", str(table), class_names=str(tmp_path / "absent.txt"))


def test_the_class_names_key_reaches_the_run(tmp_path):
    from ccar.engine.build import dataset_from_config
    from ccar.engine.config import load_config

    table = make_csv(tmp_path / "table")
    (tmp_path / "names.txt").write_text("Felis\nCanis\nDromaius\n")
    cfg = load_config(None, ["dataset=csv", f"data_root={table}", f"class_names={tmp_path / 'names.txt'}"])
    assert dataset_from_config(cfg).class_names == ["Felis", "Canis", "Dromaius"]


def test_a_text_initialised_head_gets_the_class_names(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import ccar.models.pretrained as pretrained
    from ccar.engine.config import load_config
    from ccar.engine.train import train
    from test_pretrained import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    photos = make_folder_tree(tmp_path / "photos", split=True)
    (photos / "classes.txt").write_text("ant formica\nbee apis\ncow bos\n")
    seen, real = [], pretrained.text_classifier
    monkeypatch.setattr(pretrained, "text_classifier", lambda src, names, prompt: seen.append(list(names))
                        or real(src, names, prompt))
    train(load_config(None, ["dataset=folder", f"data_root={photos}", f"model.name=hf:{clip}", "head.init=text",
                             "finetune=linear", "epochs=1", "optim.batch_size=8", "threads=1", "progress=false",
                             f"out={tmp_path / 'run'}"]), log=lambda *_: None)
    assert seen == [["formica", "apis", "bos"]]
