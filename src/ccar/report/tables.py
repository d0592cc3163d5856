"""Plain-text and Markdown tables of metrics."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from ..metrics import rank_thirds, shot_groups


def fmt(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def group_sizes(class_counts: Sequence[int]) -> str:
    shots = {k: len(v) for k, v in shot_groups(class_counts).items()}
    return ", ".join(f"{k} {n}" for k, n in shots.items())


def metrics_table(rows: Dict[str, dict], class_counts: Sequence[int]) -> str:
    """A fixed-width table of top-1, shot groups, rank thirds and ECE, one row per entry of ``rows``."""
    thirds = rank_thirds(class_counts)
    header = f"{'test (%)':<14}{'top-1':>7}{'many':>7}{'medium':>8}{'few':>6}{'head':>7}{'middle':>8}{'tail':>6}{'ECE':>7}"
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        g = m["groups"]
        lines.append(
            f"{name:<14}{fmt(m['top1']):>7}{fmt(m['many']):>7}{fmt(m['medium']):>8}{fmt(m['few']):>6}"
            f"{fmt(g['head']):>7}{fmt(g['middle']):>8}{fmt(g['tail']):>6}{fmt(m['ece']):>7}"
        )
    lines.append(
        f"shot groups by training count (many > 100, medium 20-100, few < 20): {group_sizes(class_counts)} classes; "
        f"head/middle/tail = thirds by class rank ({len(thirds['head'])}/{len(thirds['middle'])}/{len(thirds['tail'])})"
    )
    agnostic = {name: m["test_agnostic"] for name, m in rows.items() if m.get("test_agnostic")}
    if agnostic:
        keys = list(next(iter(agnostic.values())))
        short = [k.replace("forward-", "F").replace("backward-", "B").replace("uniform", "uni") for k in keys]
        header = f"{'test-agnostic':<14}" + "".join(f"{k:>6}" for k in short)
        lines += ["", header, "-" * len(header)]
        lines += [f"{name:<14}" + "".join(f"{fmt(a[k]):>6}" for k in keys) for name, a in agnostic.items()]
        lines.append("top-1 (%) under test label distributions long-tailed like training (F: forward) or reversed "
                     "(B: backward) by that factor, from the per-class accuracies (importance weighting)")
    return "\n".join(lines)


def sade_table(aggregation: Dict[str, dict]) -> str:
    """SADE's test-time aggregation per test-agnostic prior: the equal-weight ensemble against the self-supervised
    weights, on the test set sub-sampled to each prior (:mod:`ccar.engine.test_time`)."""
    keys = list(aggregation)
    short = [k.replace("forward-", "F").replace("backward-", "B").replace("uniform", "uni") for k in keys]
    header = f"{'sade (%)':<14}" + "".join(f"{k:>6}" for k in short)
    lines = [header, "-" * len(header)]
    for name, field in (("equal weights", "equal"), ("self-superv.", "self_supervised")):
        lines.append(f"{name:<14}" + "".join(f"{fmt(aggregation[k][field]):>6}" for k in keys))
    lines.append("top-1 on the test set sub-sampled to each prior; self-superv.: the experts' weights learnt on its "
                 "unlabeled images (two views' agreement), SADE's test-time aggregation")
    return "\n".join(lines)
