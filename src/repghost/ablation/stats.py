"""Welch's t-test (unequal variances), its confidence interval, and the non-inferiority test (TOST)
for "does not hurt" claims; the t distribution comes from scipy when scipy is installed."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

__all__ = ["welch_t", "mean_std", "non_inferiority"]


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _welch_parts(a: Sequence[float], b: Sequence[float]) -> Dict[str, Optional[float]]:
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per group, got {na} and {nb}")
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    sa, sb = va / na, vb / nb
    if sa + sb == 0:  # no spread at all: t undefined (infinite, or 0/0)
        return {"difference": ma - mb, "se": None, "dof": None}
    dof = (sa + sb) ** 2 / ((sa**2) / (na - 1) + (sb**2) / (nb - 1))
    return {"difference": ma - mb, "se": math.sqrt(sa + sb), "dof": dof}


def welch_t(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> Dict[str, Optional[float]]:
    """Welch's t statistic of ``mean(a) - mean(b)``, its Welch-Satterthwaite degrees of freedom,
    the two-sided p-value, and the ``confidence`` interval of the difference (``ci_low``,
    ``ci_high``); p and the interval are ``None`` where scipy is not installed or the test is
    undefined (no spread at all).

    t = (ma - mb) / sqrt(va/na + vb/nb), dof = (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)),
    with sample variances (ddof=1); interval = difference ± t_{(1+confidence)/2, dof} x se. Needs
    at least 2 values on each side.
    """
    parts = _welch_parts(a, b)
    diff, se, dof = parts["difference"], parts["se"], parts["dof"]
    out: Dict[str, Optional[float]] = {"difference": diff, "t": None, "dof": dof, "p": None,
                                       "confidence": confidence, "ci_low": None, "ci_high": None}
    if se is None:
        return out
    out["t"] = diff / se  # type: ignore[operator]
    student = _student_t()
    if student is not None:
        out["p"] = float(2 * student.sf(abs(out["t"]), dof))  # type: ignore[arg-type]
        half = float(student.ppf((1 + confidence) / 2, dof)) * se
        out["ci_low"], out["ci_high"] = diff - half, diff + half  # type: ignore[operator]
    return out


def non_inferiority(a: Sequence[float], b: Sequence[float], margin: float, *, alpha: float = 0.05) -> Dict[str, Optional[float]]:
    """Is ``mean(a)`` not worse than ``mean(b)`` by ``margin`` or more? Welch's two one-sided tests
    (TOST) against the bounds ``-margin`` and ``+margin`` of the difference ``mean(a) - mean(b)``.

    ``p_lower`` tests H0: difference <= -margin (rejected: a is non-inferior); ``p_upper`` tests
    H0: difference >= +margin; ``p_equivalence = max`` of the two (rejected: equivalent within the
    margin). ``ci_low``/``ci_high`` are the ``1 - 2 alpha`` interval the tests correspond to. The
    p-values are ``None`` where scipy is not installed or there is no spread at all.
    """
    if not margin > 0:
        raise ValueError(f"a non-inferiority margin must be > 0 (in the metric's units), got {margin!r}")
    parts = _welch_parts(a, b)
    diff, se, dof = parts["difference"], parts["se"], parts["dof"]
    out: Dict[str, Optional[float]] = {"difference": diff, "margin": margin, "dof": dof, "p_lower": None,
                                       "p_upper": None, "p_equivalence": None, "confidence": 1 - 2 * alpha,
                                       "ci_low": None, "ci_high": None}
    student = _student_t()
    if se is None or student is None:
        return out
    out["p_lower"] = float(student.sf((diff + margin) / se, dof))  # type: ignore[operator]
    out["p_upper"] = float(student.cdf((diff - margin) / se, dof))  # type: ignore[operator]
    out["p_equivalence"] = max(out["p_lower"], out["p_upper"])
    half = float(student.ppf(1 - alpha, dof)) * se
    out["ci_low"], out["ci_high"] = diff - half, diff + half  # type: ignore[operator]
    return out


def _student_t():
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return None
    return student_t
