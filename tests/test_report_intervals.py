"""The report's credible intervals: Beta quantiles against closed forms and sampling, and the
Beta parameters derived for approach rows (qis_beam.report.intervals)."""

from __future__ import annotations

import numpy as np
import pytest

from qis_beam.report.intervals import approach_beta, beta_cdf, beta_quantile, credible_interval
from qis_beam.synthesis import Synthesis

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z

# ------------------------------------------------------------------------ Beta quantiles


@pytest.mark.parametrize("q", [0.01, 0.05, 0.5, 0.9, 0.99])
def test_beta_quantile_matches_closed_forms(q):
    assert beta_quantile(q, 1.0, 1.0) == pytest.approx(q, abs=1e-9)  # uniform
    assert beta_quantile(q, 3.5, 1.0) == pytest.approx(q ** (1 / 3.5), abs=1e-9)  # x^a
    assert beta_quantile(q, 1.0, 4.0) == pytest.approx(1 - (1 - q) ** (1 / 4.0), abs=1e-9)


@pytest.mark.parametrize("a,b", [(5.3, 2.7), (40.0, 160.0), (1.2, 0.8), (300.5, 2.5)])
def test_beta_quantile_agrees_with_sampling(a, b):
    draws = np.random.default_rng(7).beta(a, b, 400_000)
    for q in (0.05, 0.5, 0.95):
        assert beta_quantile(q, a, b) == pytest.approx(np.quantile(draws, q), abs=3e-3)
    assert beta_cdf(float(np.median(draws)), a, b) == pytest.approx(0.5, abs=3e-3)


def test_beta_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        beta_quantile(1.5, 1.0, 1.0)
    with pytest.raises(ValueError):
        beta_quantile(0.5, 0.0, 1.0)


# ------------------------------------------------------------- intervals of approach rows


def test_approach_beta_uses_the_rows_own_alpha_beta():
    row = {"success_mean": 0.75, "success_alpha": 3.0, "success_beta": 1.0, "total_weight": 9.0}
    assert approach_beta(row, {}) == (3.0, 1.0, True)


def test_derived_beta_is_exact_without_open_packets():
    """No OPEN packet: every unit of weight is evidence, so the derived Beta equals the exact
    posterior 1 + sum(w s), 1 + sum(w (1 - s)) of each approach, computed here from the packets."""
    rng = np.random.default_rng(3)
    synthesis = Synthesis()
    exact: dict[str, list[float]] = {}
    for i in range(400):
        approach = f"ap{i % 5}"
        outcome = int(rng.choice([1, 2, 3], p=[0.2 + 0.12 * (i % 5), 0.2, 0.6 - 0.12 * (i % 5)]))
        w = float(rng.uniform(0.2, 1.0))
        s = {1: 1.0, 2: 0.5, 3: 0.0}[outcome]
        ab = exact.setdefault(approach, [1.0, 1.0])
        ab[0] += w * s
        ab[1] += w * (1 - s)
        node = bytes([i % 37]) * 16
        synthesis.add(node, approach, outcome, 0.01, w, T0 + i, "t/v1")
    record = synthesis.extract()
    assert record["approaches"]
    for row in record["approaches"]:
        alpha, beta, is_exact = approach_beta(row, record)
        assert not is_exact
        assert (alpha, beta) == pytest.approx(tuple(exact[row["approach_id"]]), rel=1e-9)


def test_derived_beta_keeps_success_mean_and_respects_bounds():
    address = {"total_weight": 100.0, "success_alpha": 26.0, "success_beta": 26.0}  # half OPEN
    for row in (
        {"success_mean": 0.8, "total_weight": 10.0},
        {"success_mean": 0.2, "total_weight": 0.5},  # tiny weight: alpha >= 1 forces S up
        {"success_mean": 0.5, "total_weight": 0.0},
    ):
        alpha, beta, _ = approach_beta(row, address)
        assert alpha / (alpha + beta) == pytest.approx(row["success_mean"])
        assert alpha >= 1.0 - 1e-9 and beta >= 1.0 - 1e-9
        s = alpha + beta - 2.0
        assert s <= max(row["total_weight"], 1 / 0.2 - 2) + 1e-9
    # Half the address's weight is OPEN: the approach gets half its weight as evidence.
    alpha, beta, _ = approach_beta({"success_mean": 0.8, "total_weight": 10.0}, address)
    assert alpha + beta == pytest.approx(2.0 + 5.0)

    # More evidence, narrower interval.
    def interval(weight):
        return credible_interval(
            *approach_beta({"success_mean": 0.6, "total_weight": weight}, address)[:2]
        )

    narrow, wide = interval(80.0), interval(8.0)
    assert wide[0] < narrow[0] < 0.6 < narrow[1] < wide[1]
