"""Ingestion checks of spec section 4, as a pure function over raw record bytes.

:func:`validate` runs the checks in the spec's order and names the first one that fails;
it never raises on any input. Beam transforms, the benchmark reference and the tests all
call it, so there is one definition of a valid packet.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from google.protobuf.message import DecodeError

from qis_beam.proto import packet_pb2
from qis_beam.signing import (
    NODE_ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Signed,
    node_id_for,
    verify,
    verify_many,
)

# Ingestion reasons, in check order (spec section 4).
INGEST_REASONS = (
    "oversize",
    "undecodable",
    "unsigned",
    "bad_signature",
    "unsupported_version",
    "node_id_mismatch",
    "unknown_node",
    "invalid_field",
    "future_event_time",
)
DUPLICATE_REASON = "conflicting_duplicate"
TOO_LATE_REASON = "too_late"
ALL_REASONS = INGEST_REASONS + (DUPLICATE_REASON, TOO_LATE_REASON)

TEMPLATE_ID_RE = re.compile(r"[a-z0-9_.:/-]{1,64}")
APPROACH_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.:=/+-]{0,63}")
MAX_METRICS = 8
MAX_EMBEDDING = 64


@dataclasses.dataclass(frozen=True)
class ValidationPolicy:
    max_packet_bytes: int = 1024
    allow_unsigned: bool = False
    registry: frozenset[bytes] | None = None
    max_clock_skew_ms: int = 5 * 60_000
    # The pipeline's clock for `future_event_time`; None reads the wall clock per call.
    now_ms: int | None = None

    def clock_ms(self) -> int:
        return self.now_ms if self.now_ms is not None else int(time.time() * 1000)


class Accepted(NamedTuple):
    packet: packet_pb2.OutcomePacket
    payload: bytes  # exactly the signed bytes: duplicates are compared on these


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    packet_id: bytes | None = None


_node_id_cache: dict[bytes, bytes] = {}


def _cached_node_id(public_key: bytes) -> bytes:
    # Few nodes, many packets: SHA-256 per packet is measurable on the hot path.
    node_id = _node_id_cache.get(public_key)
    if node_id is None:
        if len(_node_id_cache) > 100_000:
            _node_id_cache.clear()
        node_id = _node_id_cache[public_key] = node_id_for(public_key)
    return node_id


_valid_ids: dict[str, bool] = {}


def _id_ok(pattern: re.Pattern, text: str) -> bool:
    # Template and approach ids repeat across packets: remember verdicts (bounded).
    key = pattern.pattern + "\0" + text
    verdict = _valid_ids.get(key)
    if verdict is None:
        if len(_valid_ids) > 100_000:
            _valid_ids.clear()
        verdict = _valid_ids[key] = pattern.fullmatch(text) is not None
    return verdict


def _all_finite(values) -> bool:
    # One C-level sum is finite iff every term is, unless finite terms overflow.
    return math.isfinite(sum(values)) or all(math.isfinite(v) for v in values)


def _invalid_field(packet: packet_pb2.OutcomePacket, skew_ms: int) -> str | None:
    """The first broken rule of spec section 2 (other than version and node id), or None."""
    if len(packet.packet_id) != 16:
        return f"packet_id has {len(packet.packet_id)} bytes, expected 16"
    if len(packet.semantic_address) != 32:
        return f"semantic_address has {len(packet.semantic_address)} bytes, expected 32"
    if not _id_ok(TEMPLATE_ID_RE, packet.template_id):
        return "template_id must be 1-64 chars of [a-z0-9_.:/-]"
    if not _id_ok(APPROACH_ID_RE, packet.approach_id):
        return "approach_id must be 1-64 chars, [a-z0-9][a-z0-9_.:=/+-]*"
    outcome_type = packet.outcome_type
    if not 1 <= outcome_type <= 4:
        return f"outcome_type {outcome_type} is not RESOLVED, PARTIAL, CONTRADICTED or OPEN"
    if not math.isfinite(packet.outcome_delta):
        return "outcome_delta must be finite"
    confidence = packet.confidence
    if not (0.0 <= confidence <= 1.0):  # also false for NaN
        return f"confidence {confidence!r} is outside [0, 1]"
    event_time_ms = packet.event_time_ms
    if event_time_ms <= 0:
        return f"event_time_ms {event_time_ms} must be > 0"
    if packet.emit_time_ms < event_time_ms - skew_ms:
        return "emit_time_ms is earlier than event_time_ms - max clock skew"
    metrics = packet.metrics
    if metrics:
        if len(metrics) > MAX_METRICS:
            return f"metrics has {len(metrics)} entries, at most {MAX_METRICS}"
        if not _all_finite(list(metrics.values())):
            bad = next(name for name, value in metrics.items() if not math.isfinite(value))
            return f"metrics[{bad!r}] must be finite"
    embedding = packet.context_embedding
    if embedding:
        if len(embedding) > MAX_EMBEDDING:
            return f"context_embedding has {len(embedding)} values, at most 64"
        if not _all_finite(embedding):
            return "context_embedding values must be finite"
    return None


def validate(
    record: bytes,
    policy: ValidationPolicy,
    now_ms: int | None = None,
    verify_signature: Callable[[bytes, bytes, bytes], bool] = verify,
) -> Accepted | Rejection:
    """The parsed packet and its payload when ``record`` is valid, else the first failing check.

    ``verify_signature(public_key, signature, payload)`` is called only for well-formed key
    and signature sizes (see :func:`validate_batch` for why it is a parameter).
    """
    if len(record) > policy.max_packet_bytes:
        return Rejection(
            "oversize", f"envelope is {len(record)} bytes, limit {policy.max_packet_bytes}"
        )
    envelope = packet_pb2.Envelope()
    packet = packet_pb2.OutcomePacket()
    try:
        envelope.ParseFromString(record)
        payload = envelope.payload
        packet.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as error:
        return Rejection("undecodable", f"not a qis.v1 Envelope/OutcomePacket: {error}"[:200])
    packet_id = packet.packet_id or None
    signature, public_key = envelope.signature, envelope.public_key
    if not signature:
        if not policy.allow_unsigned:
            return Rejection(
                "unsigned", "empty signature (use --allow-unsigned to accept)", packet_id
            )
    elif (
        len(signature) != SIGNATURE_BYTES
        or len(public_key) != PUBLIC_KEY_BYTES
        or not verify_signature(public_key, signature, payload)
    ):
        return _bad_signature(len(signature), len(public_key), packet_id)
    if packet.schema_version != 1:
        return Rejection(
            "unsupported_version", f"schema_version {packet.schema_version}, expected 1", packet_id
        )
    if len(public_key) != PUBLIC_KEY_BYTES:
        return Rejection(
            "node_id_mismatch", f"public_key has {len(public_key)} bytes, expected 32", packet_id
        )
    if len(packet.node_id) != NODE_ID_BYTES or packet.node_id != _cached_node_id(public_key):
        return Rejection("node_id_mismatch", "node_id is not SHA-256(public_key)[:16]", packet_id)
    if policy.registry is not None and public_key not in policy.registry:
        return Rejection("unknown_node", "public_key is not in the node registry", packet_id)
    now = now_ms if now_ms is not None else policy.clock_ms()
    problem = _invalid_field(packet, policy.max_clock_skew_ms)
    if problem is not None:
        return Rejection("invalid_field", problem, packet_id)
    if packet.event_time_ms > now + policy.max_clock_skew_ms:
        return Rejection(
            "future_event_time",
            f"event_time_ms {packet.event_time_ms} is more than the max clock skew after {now}",
            packet_id,
        )
    return Accepted(packet, payload)


def _bad_signature(signature_bytes: int, public_key_bytes: int, packet_id: bytes | None):
    return Rejection(
        "bad_signature",
        f"Ed25519 signature ({signature_bytes} bytes) does not verify with the "
        f"{public_key_bytes}-byte public key",
        packet_id,
    )


def validate_batch(
    records: Sequence[bytes],
    policy: ValidationPolicy,
    now_ms: int,
    verify_all: Callable[[list[Signed]], list[bool]] = verify_many,
) -> list[Accepted | Rejection]:
    """:func:`validate` for each record, with all signatures verified in one call of
    ``verify_all`` (a :class:`~qis_beam.signing.ThreadedVerifier` spreads them over threads).

    The other checks run first, as if every signature verified; a signature that then fails
    turns the verdict into ``bad_signature``, which comes before every later check, so the
    verdicts are exactly those of :func:`validate`.
    """
    pending: list[Signed] = []
    pending_at: list[int] = []

    def defer(public_key: bytes, signature: bytes, payload: bytes) -> bool:
        pending.append((public_key, signature, payload))
        return True

    verdicts: list[Accepted | Rejection] = []
    for record in records:
        waiting = len(pending)
        verdicts.append(validate(record, policy, now_ms, defer))
        if len(pending) != waiting:
            pending_at.append(len(verdicts) - 1)
    for at, ok in zip(pending_at, verify_all(pending), strict=True):
        if not ok:
            verdict = verdicts[at]  # a later check's verdict: its packet_id is the packet's
            packet_id = verdict.packet.packet_id if type(verdict) is Accepted else verdict.packet_id
            verdicts[at] = _bad_signature(SIGNATURE_BYTES, PUBLIC_KEY_BYTES, packet_id or None)
    return verdicts
