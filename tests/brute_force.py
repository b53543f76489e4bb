"""Expected synthesis records folded packet by packet with the pure ``qis_beam.synthesis`` API.

A reference for the pipelines that shares none of their batching (no columnar fold, no
buckets, no combiner): every window a packet belongs to is found here by brute force, and
each (address, window) is one :class:`~qis_beam.synthesis.Synthesis` fed one packet at a
time. Pipelines merge partials in an order of their own, so floats are compared up to
rounding; everything else must be equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest

from qis_beam.proto import packet_pb2
from qis_beam.synthesis import Synthesis, SynthesisParams

# Fields that say where a record belongs, not what it found.
PLACE_FIELDS = ("address", "window_start_ms", "window_end_ms", "pane")
Key = tuple[str, int | None]  # (address hex, window start ms; None for all time)


def packet_of(record: bytes) -> packet_pb2.OutcomePacket:
    envelope = packet_pb2.Envelope.FromString(record)
    return packet_pb2.OutcomePacket.FromString(envelope.payload)


def window_starts(event_ms: int, size_ms: int, period_ms: int | None = None) -> list[int]:
    """Starts s (multiples of the period) of every window [s, s + size) holding event_ms."""
    period = period_ms or size_ms
    latest = event_ms - event_ms % period
    return [s for s in range(latest - size_ms, latest + 1, period) if event_ms < s + size_ms]


def expected_records(
    records: Iterable[bytes],
    size_ms: int,
    period_ms: int | None = None,
    params: SynthesisParams | None = None,
) -> dict[Key, dict[str, Any]]:
    """{(address, window start or None): extracted statistics} of distinct valid records."""
    folds: dict[Key, Synthesis] = {}
    for record in records:
        p = packet_of(record)
        address = p.semantic_address.hex()
        keys = [(address, None)] + [
            (address, s) for s in window_starts(p.event_time_ms, size_ms, period_ms)
        ]
        for key in keys:
            folds.setdefault(key, Synthesis()).add(
                p.node_id,
                p.approach_id,
                p.outcome_type,
                p.outcome_delta,
                p.confidence,
                p.event_time_ms,
                p.template_id,
            )
    params = params or SynthesisParams()
    expected = {}
    for key, synthesis in folds.items():
        stats = synthesis.extract(params)
        if not stats.get("suppressed"):
            stats = {"template_id": synthesis.template_id, **stats}
        expected[key] = stats
    return expected


def by_key(rows: Iterable[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Output records keyed like :func:`expected_records`, each (address, window) once."""
    keyed: dict[Key, dict[str, Any]] = {}
    for row in rows:
        key = (row["address"], row["window_start_ms"])
        assert key not in keyed, f"two records for {key}"
        keyed[key] = row
    return keyed


def statistics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in PLACE_FIELDS}


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal, except floats (which may differ by merge-order rounding)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not math.isnan(want):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
    else:
        assert got == want, (where, got, want)


def assert_same_syntheses(got: dict[Key, dict], want: dict[Key, dict]) -> None:
    """Same (address, window) keys, and the same statistics for each."""
    assert sorted(got, key=str) == sorted(want, key=str)
    for key in want:
        assert_close(statistics(got[key]), statistics(want[key]), str(key))
