"""ccar sweep on generated data: grid expansion, resume, report statistics, concurrency."""

import json

import pytest
import yaml

from ccar import ConfigError
from ccar.report.sweep_report import mean_std, paired_delta, summary_table
from ccar.sweep import expand, load_sweep, read_results, run_sweep
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
        "report": {"per_class": ["CE", "CCAR-CE"], "baselines": {"CCAR-CE": "CE"}, "omega": ["CCAR-CE"]},
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


def test_sweep_runs_resumes_and_reports(tmp_path, digits, monkeypatch):
    path = sweep_file(tmp_path, digits)
    import ccar.sweep as sweep_mod

    real, calls = sweep_mod._run_cell, []

    def die_on_third(cell, run_dir, threads):
        calls.append(cell.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cell, run_dir, threads)

    monkeypatch.setattr(sweep_mod, "_run_cell", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(path), log=lambda *_: None)
    results = tmp_path / "sweep" / "results.jsonl"
    assert len(read_results(results)) == 2
    monkeypatch.setattr(sweep_mod, "_run_cell", real)
    report = run_sweep(str(path), log=lambda *_: None)
    rows = read_results(results)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4  # finished cells were not run twice
    text = report.read_text()
    assert "| CE | 2 |" in text and "CCAR-CE − CE" in text and "ccar sweep" in text
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
    assert paired_delta([run(0, 50.1), run(1, 51.9), run(2, 54.2)], base)["verdict"] == "within seed noise"
    table = summary_table({"A": base, "B": better}, ["A", "B"])
    assert "| B | 3 | **57.2 ± 2.0** |" in table and "| A | 3 | 52.0 ± 2.0 |" in table


def test_two_stage_methods_run_both_stages_as_one_cell(tmp_path, digits):
    path = sweep_file(tmp_path, digits, seeds=[0], methods={
        "CE": {"loss.name": "ce"},
        "cRT": {"loss.name": "ce", "stage2": {"method": "crt", "epochs": 1}},
        "tau-norm": {"loss.name": "ce", "tau_norm": "auto"},
        "CB-RS": {"loss.name": "ce", "sampler": "class-balanced"},
    }, report={"baselines": {}})
    run_sweep(str(path), log=lambda *_: None)
    rows = {r["method"]: r for r in read_results(tmp_path / "sweep" / "results.jsonl")}
    assert set(rows) == {"CE", "cRT", "tau-norm", "CB-RS"}
    crt = rows["cRT"]
    assert crt["config"]["retrain"] == "crt" and crt["config"]["parent"].endswith("cRT/seed=0")
    assert "stage1_top1" in crt and crt["config"]["sampler"] == "class-balanced"
    assert rows["CB-RS"]["config"]["sampler"] == "class-balanced"
    with pytest.raises(ConfigError, match="stage2 must be a mapping with method"):
        expand({"methods": {"X": {"stage2": {"epochs": 1}}}})
