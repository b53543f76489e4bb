"""A Beam distribution per stateful step of the encoded size of each state value written.

Its max is "the largest state value per key" that Flink and Dataflow operators must keep
flat as traffic grows; tests and benchmarks read it from the pipeline's metrics.
"""

from __future__ import annotations

from apache_beam.metrics import Metrics

from qis_beam.transforms.deadletters import NAMESPACE

STATE_BYTES_PREFIX = "state_bytes."
_distributions: dict = {}


def state_size(step: str):
    """``qis/state_bytes.<step>``: sizes in bytes of the values a step writes to state."""
    if step not in _distributions:
        _distributions[step] = Metrics.distribution(NAMESPACE, STATE_BYTES_PREFIX + step)
    return _distributions[step]
