"""The order approaches are reported in (spec section 5): ``success_mean`` descending, then
``mean_delta`` descending (null last), then ``approach_id`` ascending.

Both means are rounded to 12 significant digits before they are compared, so approaches tied
mathematically rank the same whatever order their sums were accumulated (or merged) in.
"""

from __future__ import annotations


def rank_round(x: float) -> float:
    """12 significant digits, so float noise from summation order cannot break a tie.

    Correctly rounded, i.e. ``round(x, 11 - floor(log10(abs(x))))`` (the two pick the decimal
    exponent differently only within 1e-13 of a power of ten, which both then round to); zero,
    infinities and nan come back as they are (a nan maybe with another sign).
    """
    return float("%.12g" % x)  # noqa: UP031 (faster than a format spec)


def rank_key(approach_id: str, success_mean: float, mean_delta: float | None) -> tuple:
    """Sort key of one approach: smaller ranks first. Ids are distinct within an address, so
    keys are too, and sorting (key, anything) never compares past the key."""
    if mean_delta is None:
        return (-rank_round(success_mean), True, 0.0, approach_id)
    return (-rank_round(success_mean), False, -rank_round(mean_delta), approach_id)
