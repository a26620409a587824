"""Welch's t-test (unequal variances), with scipy's p-value when scipy is installed."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["welch_t", "mean_std"]


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def welch_t(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Welch's t statistic of ``mean(a) - mean(b)``, its Welch-Satterthwaite degrees of freedom,
    the two-sided p-value and the 95% confidence interval of the difference, ``ci95`` = ``[low,
    high]`` (``None`` where scipy is not installed or the test is undefined).

    t = (ma - mb) / sqrt(va/na + vb/nb), dof = (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)),
    with sample variances (ddof=1). Needs at least 2 values on each side.
    """
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per group, got {na} and {nb}")
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    sa, sb = va / na, vb / nb
    diff = ma - mb
    if sa + sb == 0:  # no spread at all: t undefined (infinite, or 0/0)
        return {"difference": diff, "t": None, "dof": None, "p": None, "ci95": None}
    t = diff / math.sqrt(sa + sb)
    dof = (sa + sb) ** 2 / ((sa**2) / (na - 1) + (sb**2) / (nb - 1))
    return {"difference": diff, "t": t, "dof": dof, "p": _two_sided_p(t, dof), "ci95": _interval(diff, math.sqrt(sa + sb), dof)}


def _two_sided_p(t: float, dof: float) -> Optional[float]:
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return None
    return float(2 * student_t.sf(abs(t), dof))


def _interval(diff: float, se: float, dof: float, level: float = 0.95) -> Optional[List[float]]:
    """``diff`` +- the two-sided Student-t quantile at ``dof`` times ``se`` (Welch's interval)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return None
    half = float(student_t.ppf(0.5 + level / 2, dof)) * se
    return [diff - half, diff + half]
