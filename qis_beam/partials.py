"""Parsed packets -> partial syntheses per (address, event-time bucket). No Beam here.

A bucket is the pre-aggregation grain of the pipeline: the window size for fixed windows,
the period for sliding ones, so every packet of a bucket falls in exactly the same windows
and a bucket's partial can be windowed by its start time. The batch path folds whole
lists of payloads here (numpy, see :func:`qis_beam.synthesis.synthesize_columns`); the
streaming path folds one packet at a time with :func:`single_packet_partial`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qis_beam.proto import packet_pb2
from qis_beam.synthesis import Synthesis, node_hash, synthesize_columns

Packet = packet_pb2.OutcomePacket


def parse_payload(payload: bytes) -> Packet:
    packet = Packet()
    packet.ParseFromString(payload)
    return packet


def fold_by_bucket(payloads: Sequence[bytes], bucket_ms: int) -> dict[tuple[str, int], Synthesis]:
    """``{(address_hex, bucket_start_ms): Synthesis}`` over validated packet payloads."""
    n = len(payloads)
    if not n:
        return {}
    hex_of: dict[bytes, str] = {}
    keys = []
    templates = []
    approaches = []
    node_hashes = np.empty(n, dtype=np.uint64)
    outcomes = np.empty(n, dtype=np.int64)
    deltas = np.empty(n, dtype=np.float64)
    confidences = np.empty(n, dtype=np.float64)
    event_times = np.empty(n, dtype=np.int64)
    for i, payload in enumerate(payloads):
        p = parse_payload(payload)
        address = p.semantic_address
        address_hex = hex_of.get(address) or hex_of.setdefault(address, address.hex())
        event_time = p.event_time_ms
        keys.append((address_hex, event_time - event_time % bucket_ms))
        templates.append(p.template_id)
        approaches.append(p.approach_id)
        node_hashes[i] = node_hash(p.node_id)
        outcomes[i] = p.outcome_type
        deltas[i] = p.outcome_delta
        confidences[i] = p.confidence
        event_times[i] = event_time
    return synthesize_columns(
        keys, templates, node_hashes, approaches, outcomes, deltas, confidences, event_times
    )


def single_packet_partial(p: Packet) -> Synthesis:
    synthesis = Synthesis()
    synthesis.add(
        p.node_id,
        p.approach_id,
        p.outcome_type,
        p.outcome_delta,
        p.confidence,
        p.event_time_ms,
        p.template_id,
    )
    return synthesis
