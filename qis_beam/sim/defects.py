"""Malformed records: one defect per ingestion reason of :mod:`qis_beam.validation`.

Malformed records go round-robin over the reasons in check order (``unsigned`` and
``bad_signature`` are skipped when the swarm is unsigned: an unsigned swarm is validated
with ``--allow-unsigned``, where neither can happen). Every other cycle of the round-robin
adds a second defect that a later check would catch, so the first failing check must win.
Each reason has a few variants used in turn; their names go to ``truth.json``.

``unknown_node`` records are signed by keys outside ``nodes.txt`` (the caller picks the key);
``future_event_time`` records carry a clock reset to 2100, so the check holds whenever the
log is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from qis_beam.emitter import seal
from qis_beam.signing import NodeKey
from qis_beam.validation import INGEST_REASONS, ValidationPolicy
from qis_beam.wire import DAY_MS, HOUR_MS, MAX_METRICS, OutcomePacket, decode_envelope

# A node whose real-time clock was reset: 2100-01-01T00:00:00Z.
FAR_FUTURE_MS = 4_102_444_800_000
_POLICY_DEFAULTS = ValidationPolicy()

# Malformations, per reason: the variants used in turn (names go to truth.json).
VARIANTS: dict[str, tuple[str, ...]] = {
    "oversize": ("long debug metric names", "full 250-value context embedding"),
    "undecodable": (
        "record cut short",
        "payload with a torn trailing field",
        "JSON line instead of an Envelope",
    ),
    "unsigned": ("empty signature",),
    "bad_signature": (
        "signature bit flipped",
        "signed by another node's key",
        "payload altered after signing",
    ),
    "unsupported_version": ("schema_version 2", "schema_version 0"),
    "node_id_mismatch": ("another node's node_id", "random node_id"),
    "unknown_node": ("key not in the registry",),
    "invalid_field": (
        "confidence in percent",
        "free-text approach_id",
        "outcome_type unset",
        "NaN outcome_delta",
        "emit_time 2h before event_time",
        "9 metrics",
        "8-byte packet_id",
        "truncated semantic_address",
        "upper-case template_id",
    ),
    "future_event_time": ("clock reset to 2100",),
}
SIGNATURE_REASONS = ("unsigned", "bad_signature")


def reasons_for(signed: bool) -> tuple[str, ...]:
    """The ingestion reasons a swarm's malformed records cover, in check order."""
    if signed:
        return INGEST_REASONS
    return tuple(r for r in INGEST_REASONS if r not in SIGNATURE_REASONS)


def variant_name(reason: str, cycle: int) -> str:
    """The variant of ``reason`` used in round-robin ``cycle`` (as listed in truth.json)."""
    return VARIANTS[reason][cycle % len(VARIANTS[reason])]


def extra_defect(reasons: Sequence[str], reason: str) -> str | None:
    """A defect that a later check would catch, compatible with ``reason``.

    Two checks later rather than the next one, because ``unsigned`` and ``bad_signature``
    cannot both hold.
    """
    i = reasons.index(reason)
    later = reasons[i + 2 : i + 3] or reasons[i + 1 : i + 2]
    return later[0] if later else None


def _break_field(packet: OutcomePacket, variant: int) -> None:
    """One broken rule of spec section 2 that only the invalid_field check catches."""
    if variant == 0:
        packet.confidence = round(100.0 * max(packet.confidence, 0.05), 1)  # >= 5
    elif variant == 1:
        packet.approach_id = "Cosine LR schedule (tuned by hand)"
    elif variant == 2:
        packet.outcome_type = 0
    elif variant == 3:
        packet.outcome_delta = math.nan
    elif variant == 4:
        packet.emit_time_ms = packet.event_time_ms - 2 * HOUR_MS
    elif variant == 5:
        packet.metrics.clear()
        packet.metrics.update({f"eval/split_{j}": float(j) for j in range(MAX_METRICS + 1)})
    elif variant == 6:
        packet.packet_id = packet.packet_id[:8]
    elif variant == 7:
        packet.semantic_address = packet.semantic_address[:20]
    else:
        packet.template_id = packet.template_id.upper()


def malformed_record(
    packet: OutcomePacket,
    key: NodeKey,
    other: NodeKey | None,
    random_id: bytes,
    defects: Sequence[str],
    cycle: int,
    signed: bool,
) -> bytes:
    """Apply ``defects`` to a built packet, then seal and frame it as the node would."""

    def variant(reason: str) -> int:
        return cycle % len(VARIANTS[reason])

    if "future_event_time" in defects:
        delay = packet.emit_time_ms - packet.event_time_ms
        packet.event_time_ms = FAR_FUTURE_MS + packet.event_time_ms % (365 * DAY_MS)
        packet.emit_time_ms = packet.event_time_ms + delay
    if "unsupported_version" in defects:
        packet.schema_version = (2, 0)[variant("unsupported_version")]
    if "node_id_mismatch" in defects:
        use_other = other is not None and variant("node_id_mismatch") == 0
        packet.node_id = other.node_id if use_other else random_id
    if "invalid_field" in defects:
        _break_field(packet, variant("invalid_field"))
    if "oversize" in defects:
        if variant("oversize") == 0:
            packet.metrics.clear()
            for j in range(8):
                name = f"debug/layer_{j:02d}/grad_norm_histogram_p99_incl_embeddings_and_head"
                packet.metrics[name * 2] = float(j)
        else:
            packet.context_embedding.extend([0.001 * j for j in range(250)])

    sign_key = key if signed and "unsigned" not in defects else None
    record = seal(sign_key, packet, public_key=key.public_key)
    if "bad_signature" in defects:
        envelope = decode_envelope(record)
        how = variant("bad_signature")
        if how == 1 and other is not None:
            envelope.signature = other.sign(envelope.payload)
        elif how == 2:
            packet.outcome_delta += 0.05
            envelope.payload = packet.SerializeToString(deterministic=True)
        else:
            envelope.signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
        record = envelope.SerializeToString()
    if "undecodable" in defects:
        how = variant("undecodable")
        if how == 0:
            record = record[:-10]  # cuts into public_key, the last field
        elif how == 1:
            envelope = decode_envelope(record)
            envelope.payload += b"\x12\x10\x00\x01\x02"  # packet_id says 16 bytes, 3 follow
            record = envelope.SerializeToString()
        else:
            record = json.dumps(
                {"approach": packet.approach_id, "delta": packet.outcome_delta}
            ).encode()
    if "oversize" in defects and len(record) <= _POLICY_DEFAULTS.max_packet_bytes:
        raise AssertionError(f"oversize record has only {len(record)} bytes")
    return record
