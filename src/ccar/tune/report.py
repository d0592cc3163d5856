"""What ``ccar tune`` leaves to read: the leaderboard (``leaderboard.md`` / ``.csv``: each candidate's best
validation score, its knobs, its trials and the budget it used, and the seed re-runs), every trial
(``trials.csv``), a figure of the search (``search.png``: validation score against time) and the printed
summary, class names included."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional

from .search import import_optuna

COLUMNS = ["method", "best val", "knobs", "trials", "settings", "pruned", "seconds", "seeds mean", "seeds std", "seeds"]


def fmt_value(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def leaderboard(study, methods: List[str], confirmed: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per candidate, best validation objective first; untried candidates last."""
    optuna = import_optuna()
    seeds = {r["method"]: r for r in confirmed.get("rows", [])}
    rows = []
    for name in methods:
        trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("method") == name]
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = max(done, key=lambda t: (t.value, -t.number)) if done else None
        s = seeds.get(name, {})
        settings = {t.user_attrs.get("label") for t in done}
        pruned = {t.user_attrs.get("label") for t in trials if t.state == optuna.trial.TrialState.PRUNED} - settings
        rows.append({"method": name, "best val": best.value if best else None,
                     "knobs": best.user_attrs["label"] if best else "", "trials": len(trials),
                     "settings": len(settings), "pruned": len(pruned),
                     "seconds": sum(t.user_attrs.get("seconds", 0.0) for t in trials),
                     "seeds mean": s.get("mean"), "seeds std": s.get("std"), "seeds": s.get("n")})
    return sorted(rows, key=lambda r: (r["best val"] is None, -(r["best val"] or 0.0)))


def markdown(rows: List[Dict[str, Any]], objective: str) -> str:
    head = (f"| method | best val {objective} | knobs | settings finished (+ only pruned) | trials | seconds | "
            "over seeds (mean ± std, n) |\n|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        seeds = f"{fmt_value(r['seeds mean'])} ± {fmt_value(r['seeds std'])} ({r['seeds']})" if r["seeds"] else "-"
        tried = f"{r['settings']} (+{r['pruned']})" if r["trials"] else "not tried"
        body += (f"| {r['method']} | {fmt_value(r['best val'])} | {r['knobs'] or '-'} | {tried} | {r['trials']} | "
                 f"{r['seconds']:.0f} | {seeds} |\n")
    return head + body


def write_leaderboard(folder: Path, rows: List[Dict[str, Any]], objective: str) -> str:
    with open(folder / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, objective)
    (folder / "leaderboard.md").write_text(text)
    return text


def write_trials(folder: Path, study) -> List[Dict[str, Any]]:
    """``trials.csv``: every trial's method, knobs, outcome, validation value, seconds, and budget spent at its end."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"trial": t.number, "method": a.get("method", t.params.get("method")), "knobs": a.get("label", ""),
                     "status": a.get("status", t.state.name.lower()), "value": a.get("value"),
                     "last_reported": max(t.intermediate_values.items())[1] if t.intermediate_values else None,
                     "epochs": a.get("epochs"), "trained_epochs": a.get("trained"), "seconds": a.get("seconds"),
                     "spent": a.get("spent"), "model_dir": a.get("model_dir")})
    with open(folder / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def search_figure(folder: Path, trials: List[Dict[str, Any]], objective: str) -> Optional[Path]:
    """Validation objective of each trial against the budget spent when it ended (pruned or stopped trials hollow,
    at their last reported score), and the best so far; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for t in trials:
        if t.get("spent") is None:
            continue
        value = t["value"] if t["value"] is not None else t["last_reported"]
        if value is None:
            continue
        colour = colours.setdefault(t["method"], f"C{len(colours) % 10}")
        done = t["status"] == "complete"
        ax.scatter(t["spent"] / 60, value, s=28, facecolors=colour if done else "none", edgecolors=colour,
                   label=t["method"] if done else None)
    best, xs, ys = None, [], []
    for t in sorted((t for t in trials if t["value"] is not None and t.get("spent") is not None),
                    key=lambda t: t["spent"]):
        best = t["value"] if best is None else max(best, t["value"])
        xs.append(t["spent"] / 60)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="k", lw=1, label="best so far")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_xlabel("budget spent (min)")
    ax.set_ylabel(f"validation {objective} (%)")
    ax.set_title("ccar tune: each trial (hollow: pruned or stopped, at its last score)")
    fig.tight_layout()
    path = folder / "search.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def per_class_table(names: List[str], counts: List[int], per_class: List[Optional[float]], limit: int = 40) -> str:
    """The winner's test accuracy per class, by name, most frequent class first (up to ``limit`` classes)."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    lines = [f"{'class':<24}{'train':>7}{'test acc.':>11}"]
    for c in order[:limit]:
        lines.append(f"{names[c][:23]:<24}{counts[c]:>7}{fmt_value(per_class[c], 1):>11}")
    if len(order) > limit:
        lines.append(f"... and {len(order) - limit} more classes (tune.json has every one)")
    return "\n".join(lines)
