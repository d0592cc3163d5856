"""ccar sweep on generated data: grid expansion, resume, report statistics, concurrency."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ccar import ConfigError
from ccar.report.stats import paired_ci, t_quantile
from ccar.report.sweep_report import mean_std, paired_delta, summary_table
from ccar.sweep import expand, load_sweep, read_results, run_sweep
from ccar.tuning import chosen_candidate, select_runs, tune_candidates
from conftest import make_idx_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("digits"), n_per_class=(50,) * 10, test_per_class=8)


def sweep_file(tmp_path, digits, **extra):
    spec = {
        "out": str(tmp_path / "sweep"),
        "base": {"dataset": "mnist-lt", "data_root": str(digits), "imbalance": 5, "epochs": 1,
                 "model": {"width": 4}, "optim": {"batch_size": 32}, "threads": 1},
        "seeds": [0, 1],
        "methods": {"CE": {"loss.name": "ce"}, "CCAR-CE": {"loss.name": "ccar", "loss.base": "ce"}},
        "report": {"per_class": ["CE", "CCAR-CE"], "baselines": {"CCAR-CE": "CE"}, "knobs": {"loss.omega": 0.75}},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_expand_grid_and_studies(tmp_path, digits):
    spec = load_sweep(str(sweep_file(tmp_path, digits, grid={"imbalance": [5, 2]},
                                     studies=[{"methods": ["CCAR-CE"], "grid": {"imbalance": [5], "loss.omega": [0.5, 0.75]}}])))
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2 + 2 * 2
    assert len({c.key for c in cells}) == len(cells)
    assert cells[-1].key == "CCAR-CE/imbalance=5/loss.omega=0.75/seed=1"
    with pytest.raises(ConfigError, match="unknown sweep key 'method'"):
        (tmp_path / "bad.yaml").write_text("method: {}\n")
        load_sweep(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="line 3: invalid YAML \\(duplicate key 'CE'"):
        (tmp_path / "bad.yaml").write_text("methods:\n  CE: {loss.name: ce}\n  CE: {loss.name: la}\n")
        load_sweep(str(tmp_path / "bad.yaml"))  # a method listed twice no longer replaces the first silently
    with pytest.raises(ConfigError, match="unknown report key 'omega'; valid: metric, reference"):
        (tmp_path / "bad.yaml").write_text("methods: {CE: {}}\nreport: {omega: [CE]}\n")
        load_sweep(str(tmp_path / "bad.yaml"))


def test_sweep_runs_resumes_and_reports(tmp_path, digits, monkeypatch):
    path = sweep_file(tmp_path, digits)
    import ccar.sweep.cell as sweep_mod

    real, calls = sweep_mod.run_cell, []

    def die_on_third(cell, *args):
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, *args)

    monkeypatch.setattr(sweep_mod, "run_cell", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(path), log=lambda *_: None)
    results = tmp_path / "sweep" / "results.jsonl"
    assert len(read_results(results)) == 2
    monkeypatch.setattr(sweep_mod, "run_cell", real)
    report = run_sweep(str(path), log=lambda *_: None)
    rows = read_results(results)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4  # finished cells were not run twice
    text = report.read_text()
    assert "| CE | 2 |" in text and "CCAR-CE − CE" in text and "ccar sweep" in text
    assert "Test-agnostic top-1" in text and "| oracle: CE + post-hoc LA to the known test prior |" in text
    assert (tmp_path / "sweep" / "groups_imbalance5.png").is_file() or (tmp_path / "sweep" / "groups_all.png").is_file()


def test_concurrent_cells_do_not_mix_results(tmp_path, digits):
    path = sweep_file(tmp_path, digits)
    run_sweep(str(path), jobs=2, log=lambda *_: None)
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    assert len(rows) == 4
    for r in rows:  # each line's config is the cell's own
        assert r["config"]["seed"] == r["seed"]
        assert r["config"]["loss"]["name"] == ("ce" if r["method"] == "CE" else "ccar")
        assert r["config"]["out"].endswith(r["key"])
        saved = json.loads((tmp_path / "sweep" / "runs" / r["key"] / "metrics.json").read_text())
        assert saved["top1"] == r["metrics"]["top1"]


def test_report_statistics_on_known_inputs():
    assert mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0, 3)
    assert mean_std([None, 5.0]) == (5.0, 0.0, 1)
    assert mean_std([]) == (None, None, 0)

    def run(seed, top1):
        groups = {"head": top1, "middle": top1, "tail": top1}
        return {"seed": seed, "metrics": {"top1": top1, "many": top1, "medium": None, "few": None, "groups": groups, "ece": 1.0}}

    base = [run(0, 50.0), run(1, 52.0), run(2, 54.0)]
    better = [run(0, 55.0), run(1, 57.5), run(2, 59.0)]
    d = paired_delta(better, base)
    assert d["mean"] == pytest.approx(5.1666666, rel=1e-6) and d["verdict"] == "helps"
    # diffs 5, 5.5, 5: mean 5.1667, sd 0.2887, t(0.975, 2) = 4.3027 -> half-width 0.7172
    assert d["low"] == pytest.approx(5.1666666 - 0.71715, abs=1e-4) and d["high"] == pytest.approx(5.88382, abs=1e-4)
    assert paired_delta([run(0, 50.1), run(1, 51.9), run(2, 54.2)], base)["verdict"] == "no clear difference"
    assert paired_delta([run(0, 49.0), run(1, 51.2), run(2, 52.9)], base)["verdict"] == "hurts"
    table = summary_table({"A": base, "B": better}, ["A", "B"])
    assert "| B | 3 | **57.2 ± 2.0** |" in table and "| A | 3 | 52.0 ± 2.0 |" in table


def test_last_epoch_check_reads_the_last_models_scores():
    def run(seed, best, last):
        groups = {"head": best, "middle": best, "tail": best}
        return {"seed": seed, "metrics": {"top1": best, "many": best, "medium": None, "few": None, "groups": groups,
                                          "ece": 1.0}, "last": {"top1": last}}

    base = [run(0, 50.0, 60.0), run(1, 52.0, 61.0), run(2, 54.0, 62.0)]
    other = [run(0, 55.0, 60.0), run(1, 57.5, 61.1), run(2, 59.0, 61.9)]
    assert paired_delta(other, base)["verdict"] == "helps"
    last = paired_delta(other, base, which="last")  # diffs 0, 0.1, -0.1
    assert last["mean"] == pytest.approx(0.0, abs=1e-9) and last["verdict"] == "no clear difference"
    assert paired_delta(other, [{"seed": 0, "metrics": {}}], which="last") is None  # rows without a last model
    table = summary_table({"A": base, "B": other}, ["A", "B"], last_epoch=True)
    assert "| method | seeds | top-1 | last epoch | many |" in table
    assert "| A | 3 | 52.0 ± 2.0 | **61.0 ± 1.0** |" in table


def test_two_stage_methods_run_both_stages_as_one_cell(tmp_path, digits):
    path = sweep_file(tmp_path, digits, seeds=[0], methods={
        "CE": {"loss.name": "ce"},
        "cRT": {"loss.name": "ce", "stage2": {"method": "crt", "epochs": 1}},
        "tau-norm": {"loss.name": "ce", "tau_norm": "auto"},
        "CB-RS": {"loss.name": "ce", "sampler": "class-balanced"},
    }, report={"baselines": {}})
    lines = []
    run_sweep(str(path), log=lines.append)
    rows = {r["method"]: r for r in read_results(tmp_path / "sweep" / "results.jsonl")}
    assert set(rows) == {"CE", "cRT", "tau-norm", "CB-RS"}
    crt = rows["cRT"]
    assert crt["config"]["retrain"] == "crt" and crt["config"]["sampler"] == "class-balanced"
    assert rows["CB-RS"]["config"]["sampler"] == "class-balanced" and "trained_by" not in rows["CB-RS"]
    # CE is trained once: cRT re-trains the classifier of CE's run, tau-norm scores CE's model its own way
    runs = tmp_path / "sweep" / "runs"
    assert crt["config"]["parent"] == str(runs / "CE" / "seed=0") and crt["trained_by"] == "CE/seed=0"
    assert crt["stage1_top1"] == rows["CE"]["metrics"]["top1"] and not (runs / "cRT" / "seed=0").exists()
    assert rows["tau-norm"]["trained_by"] == "CE/seed=0" and "tau_norm" in rows["tau-norm"]
    assert any("2 of them train nothing new" in line for line in lines)
    ce_w = load_file(runs / "CE" / "seed=0" / "last.safetensors")
    tau_w = load_file(runs / "tau-norm" / "seed=0" / "last.safetensors")
    assert ce_w.keys() == tau_w.keys() and all(torch.equal(ce_w[k], tau_w[k]) for k in ce_w)
    # ... and scores exactly as a tau-norm run trained on its own
    from ccar.engine.config import load_config
    from ccar.engine.train import train

    cell = next(c for c in expand(load_sweep(str(path))) if c.method == "tau-norm")
    alone = train(load_config(None, [*cell.overrides, f"out={tmp_path / 'alone'}", "progress=false"]),
                  log=lambda *_: None)
    assert alone["tau_norm"] == rows["tau-norm"]["tau_norm"] and alone["top1"] == rows["tau-norm"]["metrics"]["top1"]
    assert alone["per_class"] == rows["tau-norm"]["metrics"]["per_class"]
    with pytest.raises(ConfigError, match="stage2 must be a mapping with method"):
        expand({"methods": {"X": {"stage2": {"epochs": 1}}}})


def test_t_quantiles_match_tables():
    # two-sided 95 % critical values from any t table
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-3)
    assert paired_ci([0.3])["verdict"] == "one seed: no interval"


def _row(method, seed, val, test, tuned=None, values=None):
    return {"method": method, "seed": seed, "values": values or {}, "tuned": tuned or {},
            "metrics": {"val_balanced": val, "top1": test}}


def test_tuning_chooses_on_validation_only_and_reuses_the_choice():
    spec = {"methods": {"CE": {"loss.name": "ce"}, "LA": {"loss.name": "la", "tune": {"loss.tau": [0.5, 1.0, 1.5]}}},
            "seeds": [0, 1, 2]}
    cands = tune_candidates("LA", spec["methods"]["LA"])
    assert cands == [{"loss.tau": 0.5}, {"loss.tau": 1.0}, {"loss.tau": 1.5}]
    assert tune_candidates("VS", {"tune": [{"loss.gamma": 0.1, "loss.tau": 1.0}, {"loss.gamma": 0.2}]})[0] == \
        {"loss.gamma": 0.1, "loss.tau": 1.0}
    with pytest.raises(ConfigError, match="tune must map keys"):
        tune_candidates("X", {"tune": {"loss.tau": []}})
    pending = []
    first = expand(spec, [], pending)
    assert [c.key for c in first if c.method == "LA"] == ["LA/loss.tau=0.5/seed=0", "LA/loss.tau=1.0/seed=0",
                                                          "LA/loss.tau=1.5/seed=0"]
    assert len(pending) == 2 and len([c for c in first if c.method == "CE"]) == 3
    # the test score would pick tau = 0.5; validation picks 1.5, and only validation counts
    rows = [_row("LA", 0, 60.0, 90.0, {"loss.tau": 0.5}), _row("LA", 0, 61.0, 10.0, {"loss.tau": 1.0}),
            _row("LA", 0, 62.0, 11.0, {"loss.tau": 1.5})]
    assert chosen_candidate(rows, "LA", {}, cands, 0) == {"loss.tau": 1.5}
    assert chosen_candidate(rows[:2], "LA", {}, cands, 0) is None  # not every candidate has run
    later = [c for c in expand(spec, rows) if c.method == "LA" and c.seed > 0]
    assert [c.key for c in later] == ["LA/loss.tau=1.5/seed=1", "LA/loss.tau=1.5/seed=2"]
    assert "loss.tau=1.5" in later[0].overrides
    reported, records = select_runs(rows + [_row("LA", 1, 50.0, 50.0, {"loss.tau": 1.5})], spec)
    assert [r["seed"] for r in reported] == [0, 1] and all(r["tuned"] == {"loss.tau": 1.5} for r in reported)
    assert records[0]["chosen"] == {"loss.tau": 1.5} and records[0]["candidates"][0] == ({"loss.tau": 0.5}, 60.0)


def test_mapping_grid_values_set_several_keys_together():
    spec = {"methods": {"CE": {}}, "grid": {"synthetic": [{"num_classes": 3, "dim": 2}, {"num_classes": 5, "dim": 4}]}}
    cells = expand(spec)
    assert cells[1].key == "CE/synthetic.dim=4/synthetic.num_classes=5/seed=0"
    assert "synthetic.num_classes=5" in cells[1].overrides and "synthetic.dim=4" in cells[1].overrides


def test_tuned_sweep_end_to_end_and_report_only_regenerates(tmp_path, digits):
    path = sweep_file(tmp_path, digits, runs=str(tmp_path / "run-folders"), methods={
        "CE": {"loss.name": "ce"}, "CCAR-CE": {"loss.name": "ccar", "loss.base": "ce", "tune": {"loss.omega": [0.5, 0.9]}}},
        report={"baselines": {"CCAR-CE": "CE"}, "curves": ["CE", "CCAR-CE"], "metric": "balanced"})
    report = run_sweep(str(path), jobs=2, log=lambda *_: None)  # the chosen seed-1 cell is queued once ready
    rows = read_results(tmp_path / "sweep" / "results.jsonl")
    assert len(rows) == 2 + 2 + 1  # CE x 2 seeds, CCAR-CE: 2 candidates on seed 0, the chosen one on seed 1
    assert (tmp_path / "run-folders" / rows[0]["key"] / "metrics.json").is_file()
    assert all(len(r["history"]) == 1 and "val_balanced" in r["history"][0] for r in rows)
    text = report.read_text()
    assert "## Tuned knobs" in text and "95 % CI" in text and "| CCAR-CE − CE |" in text
    assert (tmp_path / "sweep" / "convergence.png").is_file()
    report.unlink()
    again = run_sweep(str(path), report_only=True, log=lambda *_: None)
    assert again.read_text() == text


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_sweep_files_expand_to_valid_configs(path):
    from ccar.engine.config import load_config

    spec = load_sweep(str(path))
    cells = expand(spec)
    assert cells
    for cell in {c.method + str(c.values): c for c in cells}.values():  # one cell per method and setting
        load_config(None, cell.overrides)  # unknown keys, wrong types and out-of-range values raise


STUDIES = sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/results.jsonl"))


@pytest.mark.parametrize("study", STUDIES)
def test_committed_reports_regenerate_from_committed_results(study, tmp_path, monkeypatch):
    """docs/results/<study>/report.md is exactly what `ccar sweep configs/sweeps/<study>.yaml --report-only` writes."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    (tmp_path / "results.jsonl").write_bytes((root / "docs" / "results" / study / "results.jsonl").read_bytes())
    report = run_sweep(f"configs/sweeps/{study}.yaml", out=str(tmp_path), report_only=True, log=lambda *_: None)
    assert report.read_text() == (root / "docs" / "results" / study / "report.md").read_text()


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_to_the_sweep_stops_its_workers(tmp_path, digits):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = sweep_file(tmp_path, digits)
    spec = yaml.safe_load(path.read_text())
    spec["base"]["epochs"] = 200  # long enough that the workers are still training when the signal comes
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "ccar", "sweep", str(path), "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((tmp_path / "sweep" / "runs").glob("*/*/checkpoint*")):
            time.sleep(0.5)  # a worker has finished an epoch: both are up and training
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the sweep never started its workers"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.2)
        assert not any(Path(f"/proc/{w}").exists() for w in workers), "pool workers outlived the sweep"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in workers:  # only if the test failed: the workers outlived the sweep
            if Path(f"/proc/{w}").exists():
                os.kill(w, signal.SIGKILL)


def test_each_sweep_worker_sees_its_own_gpus(monkeypatch):
    """What a pool worker's CUDA_VISIBLE_DEVICES becomes, without a GPU: round-robin over the visible devices, a
    group of gpus_per_run each, nothing set on a machine without GPUs."""
    import multiprocessing
    import os

    from ccar.sweep import _init_worker, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_gpus() == ["4", "5", "6", "7"]
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(5):
        _init_worker(counter, ["4", "5", "6", "7"], 2)
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["4,5", "6,7", "4,5", "6,7", "4,5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    _init_worker(counter, [], 1)  # no GPUs: the environment stays as it was
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_slurm_launcher_options_need_the_launcher_and_submitit(tmp_path, digits, monkeypatch, capsys):
    import sys

    from ccar.cli import main
    from ccar.slurm import SlurmError, SlurmOptions, check_cluster, parse_sbatch

    path = str(sweep_file(tmp_path, digits))
    assert main(["sweep", path, "--partition", "gpu"]) == 2
    assert "--partition is an option of the Slurm launcher: add --launcher slurm" in capsys.readouterr().err
    assert main(["sweep", path, "--launcher", "slurm", "--time", "0"]) == 2
    assert "--time must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(SlurmError, match=r"needs submitit: pip install 'ccar\[slurm\]'"):
        check_cluster(SlurmOptions())
    monkeypatch.delitem(sys.modules, "submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # not a Slurm login node
    with pytest.raises(SlurmError, match="Slurm's commands are not on PATH .sbatch, squeue"):
        check_cluster(SlurmOptions())
    assert not (tmp_path / "sweep" / "results.jsonl").exists()
    assert parse_sbatch(["account=abc", "--qos=high", "exclusive"]) == {"account": "abc", "qos": "high", "exclusive": True}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_sbatch(["=x"])
