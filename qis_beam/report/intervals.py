"""Credible intervals of ``success_mean``: exact Beta quantiles; the Beta of an approach row.

scipy is not a dependency, so the Beta quantile is computed here: the regularized incomplete
beta function by its continued fraction (modified Lentz), inverted by bisection. It is exact to
~1e-10, deterministic, and fast enough for a report (a few hundred approaches).
"""

from __future__ import annotations

import math
from typing import Any

CREDIBLE_LEVEL = 0.90  # the report's intervals: 5% and 95% quantiles of the posterior


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (Numerical Recipes' betacf, modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only for x < (a+1)/(a+b+2); use symmetry beyond.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q, by bisection (the CDF is monotone)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1]: {q}")
    if a <= 0.0 or b <= 0.0:
        raise ValueError(f"Beta parameters must be positive: a={a}, b={b}")
    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def credible_interval(a: float, b: float, level: float = CREDIBLE_LEVEL) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    return beta_quantile(tail, a, b), beta_quantile(1.0 - tail, a, b)


def approach_beta(
    approach: dict[str, Any], address_record: dict[str, Any]
) -> tuple[float, float, bool]:
    """(alpha, beta, exact) of one approach row of a synthesis record.

    Exact when the row carries ``success_alpha``/``success_beta``. The section-5 rows carry only
    ``success_mean`` = (1 + S_ok) / (2 + S) and ``total_weight`` (which counts OPEN packets too),
    so S -- the approach's non-OPEN weight -- is estimated as its total_weight times the
    address's non-OPEN share, (success_alpha + success_beta - 2) / total_weight, then clamped
    to what the row allows: S <= total_weight, and alpha, beta >= 1 (the uniform prior).
    alpha = m (2 + S), beta = (1 - m)(2 + S) reproduces the row's success_mean exactly.
    """
    if "success_alpha" in approach and "success_beta" in approach:
        return float(approach["success_alpha"]), float(approach["success_beta"]), True
    m = float(approach["success_mean"])
    tw = float(approach.get("total_weight") or 0.0)
    addr_tw = float(address_record.get("total_weight") or 0.0)
    addr_alpha = address_record.get("success_alpha")
    addr_beta = address_record.get("success_beta")
    if addr_tw > 0.0 and addr_alpha is not None and addr_beta is not None:
        share = min(max((addr_alpha + addr_beta - 2.0) / addr_tw, 0.0), 1.0)
    else:
        share = 1.0
    floor = max(0.0, 1.0 / m - 2.0 if m > 0 else 0.0, 1.0 / (1.0 - m) - 2.0 if m < 1 else 0.0)
    s = min(max(share * tw, floor), max(tw, floor))
    return m * (2.0 + s), (1.0 - m) * (2.0 + s), False
