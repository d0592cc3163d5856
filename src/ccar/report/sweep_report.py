"""The sweep report: mean ± std over seeds per method and setting, paired CCAR-vs-base deltas, figures."""

from __future__ import annotations

import math
import platform
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .plots import _plt, finish_figure

COLUMNS = [  # (label, getter, higher is better)
    ("top-1", lambda m: m["top1"], True),
    ("many", lambda m: m["many"], True),
    ("medium", lambda m: m["medium"], True),
    ("few", lambda m: m["few"], True),
    ("head", lambda m: m["groups"]["head"], True),
    ("middle", lambda m: m["groups"]["middle"], True),
    ("tail", lambda m: m["groups"]["tail"], True),
    ("ECE", lambda m: m["ece"], False),
]


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of the non-missing values.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0, 3)
    """
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    arr = np.asarray(vals, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def _setting(row) -> Tuple:
    return tuple(sorted((k, v) for k, v in row["values"].items()))


def _setting_name(setting: Tuple) -> str:
    return ", ".join(f"{k} = {v}" for k, v in setting) or "all runs"


def aggregate(rows: List[Dict[str, Any]]) -> "OrderedDict[Tuple, OrderedDict[str, List[dict]]]":
    """setting -> method -> list of metrics dicts (one per seed), in first-seen order."""
    out: "OrderedDict[Tuple, OrderedDict[str, List[dict]]]" = OrderedDict()
    for row in rows:
        out.setdefault(_setting(row), OrderedDict()).setdefault(row["method"], []).append(row)
    return out


def _cell(mean, std, n, bold=False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"  # no spread from a single seed
    return f"**{text}**" if bold else text


def summary_table(methods: "OrderedDict[str, List[dict]]", order: Sequence[str]) -> str:
    stats = {name: [mean_std([get(r["metrics"]) for r in runs]) for _, get, _ in COLUMNS] for name, runs in methods.items()}
    names = [m for m in order if m in stats] + [m for m in stats if m not in order]
    best = []
    for j, (_, _, higher) in enumerate(COLUMNS):
        means = [stats[n][j][0] for n in names if stats[n][j][0] is not None]
        best.append((max(means) if higher else min(means)) if means else None)
    lines = ["| method | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for n in names:
        seeds = len(methods[n])
        cells = [_cell(*stats[n][j], bold=best[j] is not None and stats[n][j][0] is not None
                       and abs(stats[n][j][0] - best[j]) < 1e-9) for j in range(len(COLUMNS))]
        lines.append(f"| {n} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_delta(runs: List[dict], base_runs: List[dict]) -> Optional[Dict[str, float]]:
    """Top-1 of a method minus its base, paired by seed (same data subset and split): mean, std, verdict."""
    by_seed = {r["seed"]: r["metrics"]["top1"] for r in base_runs}
    diffs = [r["metrics"]["top1"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    if not diffs:
        return None
    mean, std, n = mean_std(diffs)
    base_std = mean_std(list(by_seed.values()))[1]
    se = std / math.sqrt(n) if n > 1 else float("inf")
    if n < 2:
        verdict = "one seed: no verdict"
    elif abs(mean) <= 2 * se:
        verdict = "within seed noise"
    else:
        verdict = "helps" if mean > 0 else "hurts"
    return {"mean": mean, "std": std, "n": n, "base_seed_std": base_std, "verdict": verdict}


def _bar_figure(path: Path, methods, order, title) -> Optional[Path]:
    plt = _plt()
    if plt is None:
        return None
    groups = ("head", "middle", "tail")
    names = [m for m in order if m in methods]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 3.8), dpi=110)
    width = 0.8 / len(groups)
    x = np.arange(len(names))
    for i, g in enumerate(groups):
        stats = [mean_std([r["metrics"]["groups"][g] for r in methods[n]]) for n in names]
        ax.bar(x + (i - 1) * width, [s[0] or 0 for s in stats], width, yerr=[s[1] or 0 for s in stats],
               capsize=2, label=f"{g} third")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    lo = min((min(v for v in (r["metrics"]["groups"][g] for n in names for r in methods[n]) if v is not None)
              for g in groups), default=0)
    ax.set_ylim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _omega_figure(path: Path, rows, methods: Sequence[str], fixed: Dict[str, Any]) -> Optional[Path]:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6), dpi=110)
    plotted = False
    for name in methods:
        by_omega: Dict[float, List[float]] = {}
        for r in rows:
            others = {k: v for k, v in r["values"].items() if k != "loss.omega"}
            if r["method"] != name or any(others.get(k) != v for k, v in fixed.items()):
                continue
            omega = float(r["values"].get("loss.omega", r["config"]["loss"]["omega"] or 0.75))
            by_omega.setdefault(omega, []).append(r["metrics"]["top1"])
        if len(by_omega) < 2:
            continue
        xs = sorted(by_omega)
        stats = [mean_std(by_omega[o]) for o in xs]
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=name)
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("ω (confidence pivot)")
    ax.set_ylabel("test top-1 (%), mean ± std")
    title = "ω sensitivity" + (f" ({_setting_name(tuple(sorted(fixed.items())))})" if fixed else "")
    return finish_figure(plt, fig, ax, path, title)


def _hardware() -> str:
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


def write_report(folder: Path, spec: Dict[str, Any], rows: List[Dict[str, Any]], source: str = "") -> Path:
    from .plots import per_class_figure

    folder = Path(folder)
    order = list(spec["methods"])
    report_cfg = spec.get("report") or {}
    table = aggregate(rows)
    main_keys = set((spec.get("grid") or {}).keys())
    lines = [f"# Sweep report: `{source or folder}`", "",
             f"Reproduce: `ccar sweep {source}`  ·  {len(rows)} runs  ·  "
             f"{sum(r['wall_seconds'] for r in rows) / 60:.1f} min of training in total "
             f"({np.mean([r['wall_seconds'] for r in rows]) if rows else 0:.0f} s per run)  ·  {_hardware()}", "",
             "Test accuracy (%) of the model chosen on the validation split (best balanced validation accuracy), "
             "mean ± sample std over seeds; bold = best mean in the column (lowest for ECE). Shot groups by training "
             "count (many > 100, medium 20–100, few < 20; — where a group has no class) and head/middle/tail thirds "
             "by class rank.", ""]
    figures = []
    for setting, methods in table.items():
        if {k for k, _ in setting} != main_keys:
            continue  # study settings get their own table below
        lines += [f"## {_setting_name(setting)}", "", summary_table(methods, order), ""]
        deltas = []
        for method, base in (report_cfg.get("baselines") or {}).items():
            if method in methods and base in methods:
                d = paired_delta(methods[method], methods[base])
                if d:
                    deltas.append(f"| {method} − {base} | {d['mean']:+.2f} | {d['std']:.2f} | {d['base_seed_std']:.2f} | {d['n']} | {d['verdict']} |")
        if deltas:
            lines += ["CCAR against its base, top-1 paired by seed (same subset and split):", "",
                      "| comparison | Δ mean | Δ std | base seed std | seeds | verdict (|Δ| > 2 SE) |", "|---|---|---|---|---|---|",
                      *deltas, ""]
        tag = "_".join(f"{k.split('.')[-1]}{v}" for k, v in setting) or "all"
        bar = _bar_figure(folder / f"groups_{tag}.png", methods, order, f"accuracy by class-rank third — {_setting_name(setting)}")
        chosen = [m for m in report_cfg.get("per_class", []) if m in methods]
        per_class = None
        if chosen:
            counts = methods[chosen[0]][0]["metrics"]["class_counts"]
            series = {m: [mean_std([r["metrics"]["per_class"][c] for r in methods[m]])[0] for c in range(len(counts))] for m in chosen}
            per_class = per_class_figure(folder / f"per_class_{tag}.png", counts, series, f"per-class accuracy (mean over seeds) — {_setting_name(setting)}")
        for fig in (bar, per_class):
            if fig is not None:
                figures.append(fig)
                lines += [f"![{fig.stem}]({fig.name})", ""]
    studies = [(s, m) for s, m in table.items() if {k for k, _ in s} != main_keys]
    if studies:
        lines += ["## Studies", ""]
        lines += ["| setting | method | seeds | top-1 | head | middle | tail |", "|---|---|---|---|---|---|---|"]
        for setting, methods in studies:
            for name, runs in methods.items():
                cells = [_cell(*mean_std([get(r["metrics"]) for r in runs])) for label, get, _ in COLUMNS if label in ("top-1", "head", "middle", "tail")]
                lines.append(f"| {_setting_name(setting)} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    omega_methods = report_cfg.get("omega") or []
    if omega_methods:
        fixed = report_cfg.get("omega_at") or {}
        fig = _omega_figure(folder / "omega_sensitivity.png", rows, omega_methods, fixed)
        if fig is not None:
            figures.append(fig)
            lines += ["## ω sensitivity", "", f"![omega sensitivity]({fig.name})", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
