"""The sweep report: mean ± std over seeds per method and setting, paired CCAR-vs-base 95 % intervals, figures.

Everything here is a function of ``results.jsonl`` (one line per run), so ``ccar sweep FILE --report-only``
regenerates the same tables and figures from committed results. Options (the sweep file's ``report`` section)::

    metric: balanced              # headline column: balanced (mean per-class recall) or top1
    reference: bayes_balanced_accuracy   # a metrics key holding the best achievable score: adds a "gap" column
    baselines: {CCAR-LA: LA}      # paired comparisons (method − base, same seed)
    per_class: [CE, CCAR-LA]      # per-class accuracy vs training count
    curves: [CE]                  # convergence: training loss and validation accuracy per epoch
    knobs: {loss.omega: 0.75}     # study grids over these keys: a curve against the value (the default is the main grid's)
    labels: {model.hidden: {"[]": linear}}   # names for grid values in headings
    last_epoch: true              # also the last epoch's test score beside the validation-selected one (selection check)
"""

from __future__ import annotations

import json
import platform
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..tuning import select_runs
from .plots import _plt, per_class_figure, save_figure
from .stats import mean_std, paired_ci

GROUPS = [("many", lambda m: m["many"]), ("medium", lambda m: m["medium"]), ("few", lambda m: m["few"]),
          ("head", lambda m: m["groups"]["head"]), ("middle", lambda m: m["groups"]["middle"]),
          ("tail", lambda m: m["groups"]["tail"])]
METRIC_LABELS = {"balanced": "balanced acc.", "top1": "top-1"}


def _key(value) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _setting(row) -> Tuple:
    return tuple(sorted((k, _key(v)) for k, v in row["values"].items()))


def _fmt_value(v) -> str:
    if isinstance(v, str) and v[:1] in "{[":
        v = json.loads(v)
    if isinstance(v, dict) and "name" in v:
        return str(v["name"])
    if isinstance(v, dict):
        return ", ".join(f"{k} = {x}" for k, x in v.items())
    if isinstance(v, str) and "/" in v:
        return v.rstrip("/").rsplit("/", 1)[-1]  # a data folder: its name
    return str(v)


LABELS: Dict[str, Dict[str, str]] = {}  # the report's `labels` (key -> value -> name), set by write_report


def _setting_name(setting: Tuple) -> str:
    parts = []
    for k, v in setting:
        text = _fmt_value(v)
        if text in LABELS.get(k, {}):
            parts.append(LABELS[k][text])
        elif k == "setting" or (isinstance(v, str) and (v[:1] == "{" or "/" in v)):
            parts.append(text)
        else:
            parts.append(f"{k} = {text}")
    return ", ".join(parts) or "all runs"


def _tag(setting: Tuple) -> str:
    """A file-name-safe tag of a setting, e.g. ``linear_num_classes100-separation3.0``."""
    words = []
    for k, v in setting:
        text = LABELS.get(k, {}).get(_fmt_value(v)) or _fmt_value(v).replace(" = ", "")
        words.append("".join(c if c.isalnum() or c in ".-" else "-" for c in text.replace(", ", "-")).strip("-"))
    return "_".join(w for w in words if w) or "all"


def aggregate(rows: List[Dict[str, Any]]) -> "OrderedDict[Tuple, OrderedDict[str, List[dict]]]":
    """setting -> method -> list of rows (one per seed), in first-seen order."""
    out: "OrderedDict[Tuple, OrderedDict[str, List[dict]]]" = OrderedDict()
    for row in rows:
        out.setdefault(_setting(row), OrderedDict()).setdefault(row["method"], []).append(row)
    return out


def _cell(mean, std, n, bold=False, digits=1) -> str:
    if mean is None:
        return "—"
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"  # no spread from one seed
    return f"**{text}**" if bold else text


def _columns(metric: str, reference: Optional[str]):
    cols = [(METRIC_LABELS.get(metric, metric), lambda m: m[metric], True)]
    if reference:
        cols.append(("gap to optimum", lambda m: (m[reference] - m[metric]) if m.get(reference) is not None else None, False))
    cols += [(name, get, True) for name, get in GROUPS] + [("ECE", lambda m: m["ece"], False)]
    return cols


def summary_table(methods: "OrderedDict[str, List[dict]]", order: Sequence[str], metric: str = "top1",
                  reference: Optional[str] = None, last_epoch: bool = False) -> str:
    """One row per method: mean ± sample std over seeds of every column; bold = best mean of the column.
    ``last_epoch`` adds the last epoch's test ``metric`` after the headline (validation-selected) one."""
    cols = [(name, lambda r, get=get: get(r["metrics"]), higher) for name, get, higher in _columns(metric, reference)]
    if last_epoch:
        cols.insert(1, ("last epoch", lambda r: (r.get("last") or {}).get(metric), True))
    stats = {n: [mean_std([get(r) for r in runs]) for _, get, _ in cols] for n, runs in methods.items()}
    names = [m for m in order if m in stats] + [m for m in stats if m not in order]
    best = []
    for j, (_, _, higher) in enumerate(cols):
        means = [stats[n][j][0] for n in names if stats[n][j][0] is not None]
        best.append((max(means) if higher else min(means)) if means else None)
    lines = ["| method | seeds | " + " | ".join(c[0] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for n in names:
        cells = [_cell(*stats[n][j], bold=best[j] is not None and stats[n][j][0] is not None
                       and abs(stats[n][j][0] - best[j]) < 1e-9) for j in range(len(cols))]
        lines.append(f"| {n} | {len(methods[n])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_delta(runs: List[dict], base_runs: List[dict], metric: str = "top1",
                 which: str = "metrics") -> Optional[Dict[str, float]]:
    """``metric`` of a method minus its base, paired by seed, with the 95 % paired t interval and a verdict.
    ``which``: the validation-selected model ("metrics") or the last epoch's ("last")."""
    base_runs, runs = [r for r in base_runs if r.get(which)], [r for r in runs if r.get(which)]
    by_seed = {r["seed"]: r[which][metric] for r in base_runs}
    diffs = [r[which][metric] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    if not diffs:
        return None
    return {**paired_ci(diffs), "base_seed_std": mean_std(list(by_seed.values()))[1]}


def _interval(d) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.2f} (one seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def best_method(methods, metric: str) -> Tuple[str, float, float]:
    name = max(methods, key=lambda n: mean_std([r["metrics"][metric] for r in methods[n]])[0])
    mean, std, _ = mean_std([r["metrics"][metric] for r in methods[name]])
    return name, mean, std


# --- figures ------------------------------------------------------------------------------------------------------


def _bar_figure(path: Path, groups: Sequence[str], series: Dict[str, List[List[float]]], title: str, ylabel: str,
                ylim=None, tick_style=None) -> Optional[Path]:
    """Grouped bars: one group per x label, one bar per series (mean ± std of that group's values)."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(groups) * max(1, len(series) / 3) + 2), 3.8), dpi=110)
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, (label, per_group) in enumerate(series.items()):
        stats = [mean_std(values) for values in per_group]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [s[0] or 0 for s in stats], width,
               yerr=[s[1] or 0 for s in stats], capsize=2, label=label)
    ax.set_xticks(x, groups, **(tick_style or {"rotation": 35, "ha": "right", "fontsize": 8}))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(series), 4))
    ax.grid(axis="y", alpha=0.3)
    if ylim:
        ax.set_ylim(*ylim)
    return save_figure(plt, fig, path)


def _curve_figure(path: Path, settings, names: Sequence[str]) -> Optional[Path]:
    """Training loss and validation balanced accuracy per epoch (mean over seeds), one column per setting."""
    plt = _plt()
    if plt is None or not settings:
        return None
    fig, axes = plt.subplots(2, len(settings), figsize=(3.4 * len(settings) + 0.6, 5.2), dpi=110, squeeze=False)
    for j, (setting, methods) in enumerate(settings):
        for name in names:
            runs = [r for r in methods.get(name, []) if r.get("history")]
            if not runs:
                continue
            epochs = min(len(r["history"]) for r in runs)
            xs = np.arange(1, epochs + 1)
            for i, key in enumerate(("loss", "val_balanced")):
                ys = np.array([[h[key] if h[key] is not None else np.nan for h in r["history"][:epochs]] for r in runs])
                axes[i, j].plot(xs, np.nanmean(ys, 0), label=name)
        axes[0, j].set_title(_setting_name(setting), fontsize=8)
        axes[1, j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("val. balanced acc. (%)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("convergence (mean over seeds)", fontsize=10)
    return save_figure(plt, fig, path)


def _knob_figure(path: Path, knob: str, default, main, studies, metric: str) -> Optional[Path]:
    """The headline metric against a knob's value: one panel per setting (own y scale), one line per method."""
    plt = _plt()
    if plt is None:
        return None
    panels: "OrderedDict[Tuple, OrderedDict[str, Dict]]" = OrderedDict()
    for setting, methods in studies:
        keys = dict(setting)
        if knob not in keys:
            continue
        rest = tuple((k, v) for k, v in setting if k != knob)
        for name, runs in methods.items():
            panels.setdefault(rest, OrderedDict()).setdefault(name, {})[keys[knob]] = [r["metrics"][metric] for r in runs]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.6, 3.6), dpi=110, squeeze=False)
    for ax, (rest, lines) in zip(axes[0], panels.items()):
        for name, by_value in lines.items():
            if default is not None and name in main.get(rest, {}):
                by_value.setdefault(default, [r["metrics"][metric] for r in main[rest][name]])
            xs = sorted(by_value, key=lambda v: (isinstance(v, str), v))
            stats = [mean_std(by_value[x]) for x in xs]
            ax.errorbar([str(x) if isinstance(x, str) else x for x in xs], [s[0] for s in stats],
                        yerr=[s[1] for s in stats], marker="o", capsize=3, label=name)
        ax.set_title(_setting_name(rest), fontsize=9)
        ax.set_xlabel(knob + (f" (default {default})" if default is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel(f"test {METRIC_LABELS.get(metric, metric)} (%), mean ± std")
    fig.suptitle(f"sensitivity to {knob}", fontsize=10)
    return save_figure(plt, fig, path)


def hardware() -> str:
    """CPU model and cores, GPU, torch version of this machine (recorded with every sweep run)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


# --- the report ---------------------------------------------------------------------------------------------------


def write_report(folder: Path, spec: Dict[str, Any], rows: List[Dict[str, Any]], source: str = "") -> Path:
    """``report.md`` and its figures in ``folder``, from a sweep's results ``rows``: a summary table, a section
    per setting of the main grid, convergence, the tuned knobs and the studies."""
    folder = Path(folder)
    cfg = spec.get("report") or {}
    metric = cfg.get("metric", "top1")
    LABELS.clear()
    LABELS.update({k: {str(_fmt_value(_key(v))): str(name) for v, name in (m or {}).items()}
                   for k, m in (cfg.get("labels") or {}).items()})
    reported, tuning = select_runs(rows, spec)
    table = aggregate(reported)
    main_keys = set((spec.get("grid") or {}).keys())
    main = OrderedDict((s, m) for s, m in table.items() if {k for k, _ in s} == main_keys)
    studies = [(s, m) for s, m in table.items() if {k for k, _ in s} != main_keys]
    lines = _header(folder, source, rows, reported, metric, bool(cfg.get("last_epoch")))
    summary, body = _summary_head(cfg, metric), []
    for setting, methods in main.items():
        row, section = _setting_section(folder, spec, setting, methods)
        summary.append(row)
        body += section
    lines += summary + [""] + _gap_figure(folder, spec, main) + body + _convergence(folder, spec, main)
    lines += _tuning_section(tuning) + _studies_section(folder, cfg, metric, main, main_keys, studies)
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _header(folder: Path, source: str, rows, reported, metric: str, last_epoch: bool) -> List[str]:
    minutes = sum(r["wall_seconds"] for r in rows) / 60
    return [f"# Sweep report: `{source or folder}`", "",
            f"Reproduce: `ccar sweep {source}` (tables and figures from the committed `results.jsonl`: add "
            f"`--report-only`)  ·  {len(rows)} runs ({len(reported)} reported, the rest tuning candidates)  ·  "
            f"{minutes:.1f} min of training in total  ·  "
            f"{'; '.join(sorted({r.get('hardware') or 'hardware not recorded' for r in rows}))}", "",
            f"Test {METRIC_LABELS.get(metric, metric)} (%) of the model chosen on the validation split (best balanced "
            "validation accuracy), mean ± sample std over seeds; bold = best mean in the column (lowest for gap and "
            "ECE). Shot groups by training count (many > 100, medium 20–100, few < 20; — where a group has no class) "
            "and head/middle/tail thirds by class rank. Comparisons are paired by seed: Δ mean with its 95 % paired-t "
            "interval [low, high]; the verdict says \"helps\" or \"hurts\" only when the interval excludes 0."
            + (" \"last epoch\": the same runs' final-epoch model, a check on how much the validation-based choice "
               "of epoch moves the numbers (not a second selection)." if last_epoch else ""), ""]


def _summary_head(cfg: Dict[str, Any], metric: str) -> List[str]:
    baselines = cfg.get("baselines") or {}
    return ["## Summary", "", f"| setting | best method ({METRIC_LABELS.get(metric, metric)}) | " + " | ".join(
        f"{m} − {b}" for m, b in baselines.items()) + " |", "|---|---|" + "---|" * len(baselines)]


def _deltas(cfg: Dict[str, Any], methods, metric: str) -> tuple:
    """(the summary row's cells, the paired-comparison table's lines) of one setting."""
    last_epoch = bool(cfg.get("last_epoch"))
    cells = []
    deltas = ["| comparison | Δ mean | 95 % CI | seeds | base seed std | verdict |"
              + (" last epoch: Δ [95 % CI] | verdict |" if last_epoch else ""),
              "|---|---|---|---|---|---|" + ("---|---|" if last_epoch else "")]
    for method, base in (cfg.get("baselines") or {}).items():
        d = paired_delta(methods[method], methods[base], metric) if method in methods and base in methods else None
        cells.append(f"{_interval(d)} {d['verdict']}" if d else "—")
        if d:
            ci = f"[{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None else "—"
            row = f"| {method} − {base} | {d['mean']:+.2f} | {ci} | {d['n']} | {d['base_seed_std']:.2f} | {d['verdict']} |"
            if last_epoch:
                e = paired_delta(methods[method], methods[base], metric, which="last")
                row += f" {_interval(e)} | {e['verdict']} |" if e else " — | — |"
            deltas.append(row)
    return cells, deltas


def _setting_section(folder: Path, spec: Dict[str, Any], setting, methods) -> tuple:
    """(the setting's summary row, its section: table, paired comparisons, figures, test-agnostic table)."""
    cfg, order = spec.get("report") or {}, list(spec["methods"])
    metric = cfg.get("metric", "top1")
    name, mean, std = best_method(methods, metric)
    cells, deltas = _deltas(cfg, methods, metric)
    row = f"| {_setting_name(setting)} | {name} {mean:.1f} ± {std:.1f} | " + " | ".join(cells) + " |"
    body = [f"## {_setting_name(setting)}", "",
            summary_table(methods, order, metric, cfg.get("reference"), bool(cfg.get("last_epoch"))), ""]
    if len(deltas) > 2:
        what = ("CCAR against its base" if all(m.startswith("CCAR") for m in cfg.get("baselines") or {})
                else "Each method against its base")
        body += [f"{what}, test {METRIC_LABELS.get(metric, metric)} paired by seed:", "", *deltas, ""]
    for fig in _setting_figures(folder, cfg, order, setting, methods):
        if fig is not None:
            body += [f"![{fig.stem}]({fig.name})", ""]
    return row, body + agnostic_table(methods, order)


def _setting_figures(folder: Path, cfg: Dict[str, Any], order, setting, methods) -> tuple:
    """The accuracy-by-third bars and (for ``per_class`` methods) the per-class curve of one setting."""
    tag, names = _tag(setting), [m for m in order if m in methods]
    bar = _bar_figure(folder / f"groups_{tag}.png", names,
                      {f"{g} third": [[r["metrics"]["groups"][g] for r in methods[n]] for n in names]
                       for g in ("head", "middle", "tail")},
                      f"accuracy by class-rank third — {_setting_name(setting)}",
                      "test accuracy (%), mean ± std over seeds", (0, 100))
    chosen = [m for m in cfg.get("per_class", []) if m in methods]
    per_class = None
    if chosen:
        counts = methods[chosen[0]][0]["metrics"]["class_counts"]
        series = {m: [mean_std([r["metrics"]["per_class"][c] for r in methods[m]])[0] for c in range(len(counts))]
                  for m in chosen}
        per_class = per_class_figure(folder / f"per_class_{tag}.png", counts, series,
                                     f"per-class accuracy (mean over seeds) — {_setting_name(setting)}")
    return bar, per_class


def _gap_figure(folder: Path, spec: Dict[str, Any], main) -> List[str]:
    cfg, order = spec.get("report") or {}, list(spec["methods"])
    reference, metric = cfg.get("reference"), cfg.get("metric", "top1")
    if not (reference and main):
        return []
    names = [m for m in order if any(m in methods for methods in main.values())]
    fig = _bar_figure(folder / "gap_to_optimum.png", [_setting_name(s).replace(", ", "\n") for s in main],
                      {n: [[r["metrics"][reference] - r["metrics"][metric] for r in methods.get(n, [])]
                           for methods in main.values()] for n in names},
                      "gap to the best achievable score (lower is better)",
                      f"optimum − test {METRIC_LABELS.get(metric, metric)} (points)", tick_style={"fontsize": 7})
    return [f"![gap to the optimum]({fig.name})", ""] if fig is not None else []


def _convergence(folder: Path, spec: Dict[str, Any], main) -> List[str]:
    order = list(spec["methods"])
    curves = [m for m in (spec.get("report") or {}).get("curves", order[:1])]
    fig = _curve_figure(folder / "convergence.png", list(main.items()), curves)
    return ["## Convergence", "", f"![convergence]({fig.name})", ""] if fig is not None else []


def _tuning_section(tuning) -> List[str]:
    if not tuning:
        return []
    lines = ["## Tuned knobs", "", f"Each candidate trained on seed {tuning[0]['seed']}; chosen by balanced "
             "accuracy on that seed's validation split (in brackets), then reused for every seed.", "",
             "| setting | method | candidates (val. balanced acc.) | chosen |", "|---|---|---|---|"]
    for t in tuning:
        cands = ", ".join(f"{_knobs(c)} ({s:.1f})" if s is not None else _knobs(c) for c, s in t["candidates"])
        lines.append(f"| {_setting_name(_setting(t))} | {t['method']} | {cands} | {_knobs(t['chosen'])} |")
    return lines + [""]


def _studies_section(folder: Path, cfg: Dict[str, Any], metric: str, main, main_keys, studies) -> List[str]:
    if not studies:
        return []
    lines = ["## Studies", "", "Δ: the study run minus the same method in the main grid (same setting, paired "
             "by seed), 95 % paired-t interval.", "",
             f"| setting | method | seeds | {METRIC_LABELS.get(metric, metric)} | head | middle | tail | "
             "Δ vs main grid [95 % CI] | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for setting, methods in studies:
        rest = tuple((k, v) for k, v in setting if k in main_keys)
        for name, runs in methods.items():
            cells = [_cell(*mean_std([get(r["metrics"]) for r in runs])) for get in
                     (lambda m: m[metric], lambda m: m["groups"]["head"], lambda m: m["groups"]["middle"],
                      lambda m: m["groups"]["tail"])]
            d = paired_delta(runs, main[rest][name], metric) if name in main.get(rest, {}) else None
            lines.append(f"| {_setting_name(setting)} | {name} | {len(runs)} | " + " | ".join(cells)
                         + f" | {_interval(d) if d else '—'} | {d['verdict'] if d else '—'} |")
    lines.append("")
    for knob, default in (cfg.get("knobs") or {}).items():
        fig = _knob_figure(folder / f"knob_{knob.split('.')[-1]}.png", knob, default, main, studies, metric)
        if fig is not None:
            lines += [f"![{knob}]({fig.name})", ""]
    return lines


AGNOSTIC_COLUMNS = ("forward-50", "forward-10", "uniform", "backward-10", "backward-50")


def agnostic_table(methods, order: Sequence[str]) -> List[str]:
    """Test-agnostic top-1 (SADE's protocol) per method, mean ± std over seeds, and the oracle row: the method
    named CE with post-hoc logit adjustment to the known test prior. Empty for rows without these metrics."""
    names = [m for m in order if m in methods and all(r["metrics"].get("test_agnostic") for r in methods[m])]
    if not names:
        return []
    lines = ["Test-agnostic top-1 (%): test label distributions long-tailed like training (forward) or reversed "
             "(backward) by the factor shown, from the per-class test accuracies (importance weighting):", "",
             "| method | " + " | ".join(AGNOSTIC_COLUMNS) + " |", "|---" * (len(AGNOSTIC_COLUMNS) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            _cell(*mean_std([r["metrics"]["test_agnostic"][k] for r in methods[name]])) for k in AGNOSTIC_COLUMNS) + " |")
    if "CE" in names:  # (the adjustment assumes logits of the training distribution: a CE model's)
        lines.append("| oracle: CE + post-hoc LA to the known test prior | " + " | ".join(
            _cell(*mean_std([r["metrics"]["test_agnostic_oracle"][k] for r in methods["CE"]])) for k in AGNOSTIC_COLUMNS)
            + " |")
    return lines + [""] + sade_aggregation_table(methods, order) + routing_table(methods, order)


def sade_aggregation_table(methods, order: Sequence[str]) -> List[str]:
    """SADE's own protocol for its runs: on the test set sub-sampled to each prior, the equal-weight ensemble and
    the experts' weights learnt on the unlabeled test images (:mod:`ccar.engine.test_time`), mean ± std."""
    names = [m for m in order if m in methods and all(r["metrics"].get("test_agnostic_sade") for r in methods[m])]
    if not names:
        return []
    lines = ["SADE's test-time aggregation (%): top-1 on the test set sub-sampled to each prior (seeded), the "
             "experts' ensemble with equal weights and with weights learnt on that set's unlabeled images:", "",
             "| method | aggregation | " + " | ".join(AGNOSTIC_COLUMNS) + " |",
             "|---" * (len(AGNOSTIC_COLUMNS) + 2) + "|"]
    for name in names:
        for label, field in (("equal", "equal"), ("self-supervised", "self_supervised")):
            lines.append(f"| {name} | {label} | " + " | ".join(
                _cell(*mean_std([r["metrics"]["test_agnostic_sade"][k][field] for r in methods[name]]))
                for k in AGNOSTIC_COLUMNS) + " |")
    return lines + [""]


def routing_table(methods, order: Sequence[str]) -> List[str]:
    """RIDE's routed experts (``ccar retrain RUN method=router``): experts consulted per test image and the share of
    images reaching each expert, mean ± std."""
    names = [m for m in order if m in methods and all(r["metrics"].get("routing") for r in methods[m])]
    if not names:
        return []
    experts = max(r["metrics"]["routing"]["experts"] for m in names for r in methods[m])
    lines = ["RIDE's router: experts consulted per test image, and the share of test images (%) reaching each "
             "expert:", "", "| method | experts per image | " + " | ".join(f"expert {e + 1}" for e in range(experts))
             + " |", "|---" * (experts + 2) + "|"]
    for name in names:
        rows = [r["metrics"]["routing"] for r in methods[name]]
        reached = [[r["reached_percent"][e] for r in rows if e < len(r["reached_percent"])] for e in range(experts)]
        lines.append(f"| {name} | " + _cell(*mean_std([r["experts_per_image"] for r in rows]), digits=2) + " | "
                     + " | ".join(_cell(*mean_std(values)) for values in reached) + " |")
    return lines + [""]


def _knobs(candidate: Dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in candidate.items())
