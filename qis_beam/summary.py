"""summary.json (spec section 7): the run's accounting, from Beam metrics and its outputs.

The counters are the ``qis`` namespace counters incremented inside the transforms. The ingestion
equation ``records_in == valid + duplicates + dead_letters`` is checked here and reported
as ``balanced``; ``too_late`` packets are valid packets that missed their window and are
reported apart (spec section 6).
"""

from __future__ import annotations

import json
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

from qis_beam.transforms.deadletters import NAMESPACE
from qis_beam.validation import ALL_REASONS, TOO_LATE_REASON


def counters(result) -> dict[str, int]:
    """{counter name: committed value} of the qis namespace (attempted where not committed)."""
    found: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for metric in query["counters"]:
        value = metric.committed if metric.committed is not None else metric.attempted
        found[metric.key.metric.name] = found.get(metric.key.metric.name, 0) + int(value or 0)
    return found


def build_summary(
    counts: dict[str, int],
    *,
    dead_letter_reasons: dict[str, int],
    synthesis_records: dict[str, int],
    runner: str,
    wall_time_s: float,
    addresses: int,
    windows: int,
    outputs: dict[str, str],
) -> dict[str, Any]:
    """Dead letters and synthesis records are counted from the written outputs, which is
    exact on every runner (the BundleBasedDirectRunner does not report counters incremented
    in timer callbacks); records_in, valid and duplicates come from the Beam counters."""
    by_reason = {
        reason: dead_letter_reasons.get(reason, 0)
        for reason in ALL_REASONS
        if reason != TOO_LATE_REASON
    }
    dead_letters = sum(by_reason.values())
    records_in = counts.get("records_in", 0)
    valid = counts.get("valid", 0)
    duplicates = counts.get("duplicates", 0)
    return {
        "records_in": records_in,
        "valid": valid,
        "duplicates": duplicates,
        "dead_letters": {"total": dead_letters, "by_reason": by_reason},
        "too_late": dead_letter_reasons.get(TOO_LATE_REASON, 0),
        "balanced": records_in == valid + duplicates + dead_letters,
        "addresses": addresses,
        "windows": windows,
        "synthesis_records": synthesis_records,
        "runner": runner,
        "wall_time_s": round(wall_time_s, 3),
        "outputs": outputs,
    }


def write_summary(output_dir: str, summary: dict[str, Any]) -> str:
    path = FileSystems.join(output_dir, "summary.json")
    with FileSystems.create(path) as handle:
        handle.write((json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return path
