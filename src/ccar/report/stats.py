"""Statistics of the sweep report: mean ± std over seeds and paired 95 % confidence intervals (Student's t).

Comparisons are paired by seed: two methods trained with the same seed see the same data subset, validation split
and test set, so the per-seed difference removes what the seeds share. The interval is the paired t interval
mean(d) ± t(0.975, n − 1) · std(d) / √n; a verdict ("helps" / "hurts") is given only when it excludes 0.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


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


def _t_cdf(t: float, df: int) -> float:
    """Student's t CDF for t >= 0 by Simpson's rule on the density (ample for the 4-digit quantiles used here)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 2000
    h = t / steps
    total = 0.0
    for i in range(steps + 1):
        x = i * h
        w = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += w * math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom.

    >>> round(t_quantile(0.975, 4), 3), round(t_quantile(0.975, 1), 2), round(t_quantile(0.975, 1000), 2)
    (2.776, 12.71, 1.96)
    """
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean of paired differences with its two-sided t interval and a verdict.

    >>> d = paired_ci([1.0, 2.0, 3.0])
    >>> round(d["low"], 2), round(d["high"], 2), d["verdict"]
    (-0.48, 4.48, 'no clear difference')
    >>> paired_ci([1.0, 1.2, 0.9, 1.1])["verdict"]
    'helps'
    """
    mean, std, n = mean_std(diffs)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "low": None, "high": None, "verdict": "one seed: no interval"}
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "helps" if low > 0 else "hurts" if high < 0 else "no clear difference"
    return {"mean": mean, "std": std, "n": n, "low": low, "high": high, "verdict": verdict}
