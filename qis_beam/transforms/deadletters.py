"""Dead-letter records (spec section 4) and the counters that account for them."""

from __future__ import annotations

import base64

from apache_beam.metrics import Metrics

from qis_beam.validation import ALL_REASONS

NAMESPACE = "qis"
DEAD_LETTERS = "dead_letters"  # tagged output name used by every ingesting DoFn

_counters = {}


def counter(name: str):
    """A qis-namespace Beam counter; summary.json is built from these."""
    if name not in _counters:
        _counters[name] = Metrics.counter(NAMESPACE, name)
    return _counters[name]


_distributions = {}


def distribution(name: str):
    """A qis-namespace Beam distribution (e.g. packets per key of a shuffle)."""
    if name not in _distributions:
        _distributions[name] = Metrics.distribution(NAMESPACE, name)
    return _distributions[name]


def reason_counter_name(reason: str) -> str:
    if reason not in ALL_REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}")
    return f"dead_letter.{reason}"


def dead_letter(
    reason: str,
    detail: str,
    record: bytes,
    packet_id: bytes | None = None,
    source: str | None = None,
) -> dict:
    """A dead-letter record; counts it under its reason."""
    counter(reason_counter_name(reason)).inc()
    return {
        "reason": reason,
        "detail": detail,
        "record_b64": base64.b64encode(record).decode("ascii"),
        "packet_id": packet_id.hex() if packet_id else None,
        "source": source,
    }
