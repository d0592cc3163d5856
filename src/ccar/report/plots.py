"""Figures (PNG, matplotlib's Agg backend). matplotlib is an optional extra: without it figures are skipped."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'ccar[plot]'); skipping figures", stacklevel=3)
        return None
    return plt


def save_figure(plt, fig, path: Path) -> Path:
    """Lay the figure out, save it as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def finish_figure(plt, fig, ax, path: Path, title: str) -> Path:
    """Title, grid and legend in the house style, then save as PNG and free the figure."""
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def per_class_figure(path: Path, class_counts: Sequence[int], series: Dict[str, Sequence[Optional[float]]], title: str) -> Path:
    """Per-class test accuracy against training count (log x): the standard long-tail figure."""
    plt = _plt()
    if plt is None:
        return None
    counts = np.asarray(class_counts, dtype=float)
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for (name, acc), marker in zip(series.items(), "os^vD<>p*h"):
        acc = np.asarray([np.nan if a is None else a for a in acc], dtype=float)
        ax.plot(counts[order], acc[order], marker=marker, ms=4, lw=1, alpha=0.85, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(0, 100)
    for edge in (20, 100):
        if counts.min() < edge < counts.max():
            ax.axvline(edge, color="grey", lw=0.6, ls=":")
    return finish_figure(plt, fig, ax, path, title)


def omega_figure(path: Path, class_counts: Sequence[int], omega: float = 0.75, power_base: float = math.e,
                 frequency: str = "sum") -> Path:
    """Omega over p_t for the most and the least frequent training class."""
    from ..losses import omega_weight

    plt = _plt()
    if plt is None:
        return None
    counts = torch.tensor(class_counts, dtype=torch.float64)
    freq = counts / (counts.sum() if frequency == "sum" else counts.max())
    p = torch.linspace(0, 1, 401, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
    for c, name in ((int(counts.argmax()), "head"), (int(counts.argmin()), "tail")):
        w = omega_weight(p, freq[c].item(), omega=omega, base=power_base)
        ax.plot(p, w, lw=1.6, label=f"{name} class {c}: n={int(counts[c])}, f={freq[c].item():.4f}")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.axvline(omega, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("p_t (probability of the true class)")
    ax.set_ylabel("Ω(p_t, f_c)")
    return finish_figure(plt, fig, ax, path, f"CCAR weight, ω = {omega}, base = {power_base:.3g}, frequency = {frequency}")


def curves_figure(path: Path, history: List[dict]) -> Path:
    plt = _plt()
    if plt is None or not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.2), dpi=110)
    a1.plot(epochs, [h["loss"] for h in history])
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a2.plot(epochs, [h["train_top1"] for h in history], label="train top-1")
    a2.plot(epochs, [h["val_top1"] for h in history], label="val top-1")
    a2.plot(epochs, [h["val_balanced"] for h in history], label="val balanced")
    a2.set_xlabel("epoch")
    a2.set_ylabel("%")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    return save_figure(plt, fig, path)


def confusion_figure(path: Path, class_counts: Sequence[int], metrics: dict, title: str) -> Optional[Path]:
    """Where the test samples go: the row-normalised confusion matrix with the classes ordered by training count
    (most frequent first; up to 100 classes), beside the 3 x 3 matrix of the rank thirds (head, middle, tail)."""
    plt = _plt()
    if plt is None:
        return None
    groups = metrics["confusion_groups"]
    names = list(groups)
    full = metrics.get("confusion")
    fig, axes = plt.subplots(1, 2 if full is not None else 1, figsize=(9.6 if full is not None else 4.0, 4.2),
                             dpi=110, squeeze=False, gridspec_kw={"width_ratios": [2.2, 1] if full is not None else [1]})
    if full is not None:
        order = np.argsort(-np.asarray(class_counts, dtype=float), kind="stable")
        m = np.asarray(full, dtype=float)[np.ix_(order, order)]
        m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
        ax = axes[0, 0]
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        ax.set_xlabel("predicted class (by training count, most frequent first)")
        ax.set_ylabel("true class (same order)")
        if len(order) <= 20:
            ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
            ax.set_yticks(range(len(order)), [str(c) for c in order], fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
        ax.set_title(title, fontsize=10)
    ax = axes[0, -1]
    g = np.asarray([[np.nan if groups[t][p] is None else groups[t][p] for p in names] for t in names])
    ax.imshow(g, cmap="viridis", vmin=0, vmax=100)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(g[i, j]):
                ax.text(j, i, f"{g[i, j]:.0f}", ha="center", va="center", fontsize=9,
                        color="black" if g[i, j] > 50 else "white")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted as")
    ax.set_ylabel("true (rank thirds)")
    if full is None:
        ax.set_title(title, fontsize=10)
    return save_figure(plt, fig, path)


def run_figures(run_dir: Path, cfg, metrics: dict, history: List[dict]) -> List[Path]:
    counts = metrics["class_counts"]
    title = f"{cfg.dataset} (imbalance {max(counts) / min(counts):.0f}), loss {cfg.loss.name}" + (
        f" over {cfg.loss.base}" if cfg.loss.name == "ccar" else "")
    made = [
        per_class_figure(run_dir / "per_class.png", counts,
                         {"best on val": metrics["best"]["per_class"], "last epoch": metrics["last"]["per_class"]}, title),
        curves_figure(run_dir / "curves.png", history),
        confusion_figure(run_dir / "confusion.png", counts, metrics["best"], f"test confusion (best on val), {title}"),
    ]
    if cfg.loss.name == "ccar":
        made.append(omega_figure(run_dir / "omega.png", counts, cfg.loss.omega or 0.75,
                                 cfg.loss.power_base or math.e, cfg.loss.frequency or "sum"))
    return [p for p in made if p is not None]
