"""Ingestion checks of spec section 4, as a pure function over raw record bytes.

:func:`validate` runs the checks in the spec's order and names the first one that fails;
it never raises on any input. Beam transforms, the benchmark reference and the tests all
call it, so there is one definition of a valid packet.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from math import isfinite
from typing import NamedTuple

import numpy as np

from qis_beam.signing import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Signed,
    node_id_for,
    verify,
    verify_many,
)
from qis_beam.wire import (
    ADDRESS_BYTES,
    APPROACH_ID_RE,
    DEFAULT_MAX_CLOCK_SKEW_MS,
    MAX_EMBEDDING,
    MAX_METRICS,
    NODE_ID_AT,
    NODE_ID_BYTES,
    OUTCOME_NAMES,
    PACKET_ID_AT,
    PACKET_ID_BYTES,
    SCHEMA_VERSION,
    TEMPLATE_ID_RE,
    OutcomePacket,
    ScannedRecords,
    WireError,
    decode_signed,
    scan_records,
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


@dataclasses.dataclass(frozen=True)
class ValidationPolicy:
    max_packet_bytes: int = 1024
    allow_unsigned: bool = False
    registry: frozenset[bytes] | None = None
    max_clock_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS
    # The pipeline's clock for `future_event_time`; None reads the wall clock per call.
    now_ms: int | None = None

    def clock_ms(self) -> int:
        return self.now_ms if self.now_ms is not None else int(time.time() * 1000)


class Accepted(NamedTuple):
    packet: OutcomePacket
    payload: bytes  # exactly the signed bytes: duplicates are compared on these


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    packet_id: bytes | None = None


# Bounded memo tables of the hot path: few nodes and few distinct ids, many packets.
_CACHE_ENTRIES = 100_000
_node_ids: dict[bytes, bytes] = {}  # public_key -> SHA-256(public_key)[:16]
_id_problems: dict[tuple[str, str], str | None] = {}  # (template_id, approach_id) -> problem


def _ids_problem(template_id: str, approach_id: str) -> str | None:
    """The id rule a (template_id, approach_id) pair breaks first, or None; memoised."""
    key = (template_id, approach_id)
    try:
        return _id_problems[key]
    except KeyError:
        pass
    problem = None
    if not TEMPLATE_ID_RE.fullmatch(template_id):
        problem = "template_id must be 1-64 chars of [a-z0-9_.:/-]"
    elif not APPROACH_ID_RE.fullmatch(approach_id):
        problem = "approach_id must be 1-64 chars, [a-z0-9][a-z0-9_.:=/+-]*"
    if len(_id_problems) >= _CACHE_ENTRIES:
        _id_problems.clear()
    _id_problems[key] = problem
    return problem


def _node_id_of(public_key: bytes) -> bytes:
    node_id = _node_ids.get(public_key)
    if node_id is None:
        if len(_node_ids) >= _CACHE_ENTRIES:
            _node_ids.clear()
        node_id = _node_ids[public_key] = node_id_for(public_key)
    return node_id


def _invalid_field(
    packet: OutcomePacket, packet_id: bytes, event_time_ms: int, skew_ms: int
) -> str | None:
    """The first broken rule of spec section 2 (other than version and node id), or None.

    ``packet_id`` and ``event_time_ms`` are the packet's, read once by the caller: every
    field read of a parsed message costs a C call, and this runs for every record.
    """
    if len(packet_id) != PACKET_ID_BYTES:
        return f"packet_id has {len(packet_id)} bytes, expected {PACKET_ID_BYTES}"
    address = packet.semantic_address
    if len(address) != ADDRESS_BYTES:
        return f"semantic_address has {len(address)} bytes, expected {ADDRESS_BYTES}"
    problem = _ids_problem(packet.template_id, packet.approach_id)
    if problem is not None:
        return problem
    outcome_type = packet.outcome_type
    if outcome_type not in OUTCOME_NAMES:
        return f"outcome_type {outcome_type} is not RESOLVED, PARTIAL, CONTRADICTED or OPEN"
    if not isfinite(packet.outcome_delta):
        return "outcome_delta must be finite"
    confidence = packet.confidence
    if not (0.0 <= confidence <= 1.0):  # also false for NaN
        return f"confidence {confidence!r} is outside [0, 1]"
    if event_time_ms <= 0:
        return f"event_time_ms {event_time_ms} must be > 0"
    if packet.emit_time_ms < event_time_ms - skew_ms:
        return "emit_time_ms is earlier than event_time_ms - max clock skew"
    metrics = packet.metrics
    if metrics:
        if len(metrics) > MAX_METRICS:
            return f"metrics has {len(metrics)} entries, at most {MAX_METRICS}"
        # Indexing by key is twice as fast as the map's values() view (a Python-level ABC).
        values = [metrics[name] for name in metrics]
        if not _all_finite(values):
            bad = next(name for name in metrics if not isfinite(metrics[name]))
            return f"metrics[{bad!r}] must be finite"
    embedding = packet.context_embedding
    if embedding:
        if len(embedding) > MAX_EMBEDDING:
            return f"context_embedding has {len(embedding)} values, at most {MAX_EMBEDDING}"
        if not _all_finite(embedding):
            return "context_embedding values must be finite"
    return None


def _all_finite(values) -> bool:
    # One C-level sum is finite iff every term is, unless finite terms overflow.
    return isfinite(sum(values)) or all(isfinite(v) for v in values)


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
    try:
        payload, signature, public_key, packet = decode_signed(record)
    except WireError as error:
        return Rejection("undecodable", str(error)[:200])
    packet_id = packet.packet_id
    if not signature:
        if not policy.allow_unsigned:
            return Rejection(
                "unsigned", "empty signature (use --allow-unsigned to accept)", packet_id or None
            )
    elif (
        len(signature) != SIGNATURE_BYTES
        or len(public_key) != PUBLIC_KEY_BYTES
        or not verify_signature(public_key, signature, payload)
    ):
        return _bad_signature(len(signature), len(public_key), packet_id or None)
    if packet.schema_version != SCHEMA_VERSION:
        return Rejection(
            "unsupported_version",
            f"schema_version {packet.schema_version}, expected {SCHEMA_VERSION}",
            packet_id or None,
        )
    if len(public_key) != PUBLIC_KEY_BYTES:
        return Rejection(
            "node_id_mismatch",
            f"public_key has {len(public_key)} bytes, expected {PUBLIC_KEY_BYTES}",
            packet_id or None,
        )
    node_id = packet.node_id
    if len(node_id) != NODE_ID_BYTES or node_id != _node_id_of(public_key):
        return Rejection(
            "node_id_mismatch", "node_id is not SHA-256(public_key)[:16]", packet_id or None
        )
    registry = policy.registry
    if registry is not None and public_key not in registry:
        return Rejection(
            "unknown_node", "public_key is not in the node registry", packet_id or None
        )
    skew_ms = policy.max_clock_skew_ms
    event_time_ms = packet.event_time_ms
    problem = _invalid_field(packet, packet_id, event_time_ms, skew_ms)
    if problem is not None:
        return Rejection("invalid_field", problem, packet_id or None)
    now = now_ms if now_ms is not None else policy.clock_ms()
    if event_time_ms > now + skew_ms:
        return Rejection(
            "future_event_time",
            f"event_time_ms {event_time_ms} is more than the max clock skew after {now}",
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


@dataclasses.dataclass
class BatchVerdicts:
    """:func:`validate_many`'s verdicts: the valid records' packet ids and payloads (in
    record order) and every other record's rejection."""

    valid: np.ndarray  # bool, per record
    packet_ids: np.ndarray  # (valid records, 16) uint8
    payloads: list[bytes]
    rejections: list[tuple[int, Rejection]]  # (index in the batch, verdict), in order


_I64_MAX = (1 << 63) - 1


def validate_many(
    data: bytes,
    starts: np.ndarray,
    ends: np.ndarray,
    policy: ValidationPolicy,
    now_ms: int,
    verify_all: Callable[[list[Signed]], list[bool]] = verify_many,
) -> BatchVerdicts:
    """:func:`validate_batch`'s verdicts for the records ``data[starts[i]:ends[i]]``, in
    columns, computed mostly with numpy.

    Records of the usual shape (:func:`qis_beam.wire.scan_records`) that pass every check
    there are accepted without a Python call per record; every other record (any that is
    or may be invalid) is judged by :func:`validate` itself, so verdicts are exactly its.
    """
    n = len(starts)
    scan = scan_records(data, starts, ends)
    fast = scan.ok & (ends - starts <= policy.max_packet_bytes)
    if not policy.allow_unsigned:
        fast &= scan.signed
    skew, event = policy.max_clock_skew_ms, scan.event_time_ms
    if 0 <= skew < 1 << 62 and abs(now_ms) < 1 << 62:  # int64 arithmetic cannot overflow
        fast &= (event > 0) & (scan.emit_time_ms >= event - skew) & (event <= now_ms + skew)
    else:  # every record goes the per-record way
        fast[:] = False
    fast &= np.isfinite(scan.outcome_delta) & (scan.confidence >= 0.0) & (scan.confidence <= 1.0)
    fast &= (scan.metrics <= MAX_METRICS) & scan.metrics_finite
    fast &= (scan.embedding <= MAX_EMBEDDING) & scan.embedding_finite
    _check_keys_and_ids(scan, fast, policy.registry)

    verdicts: dict[int, Accepted | Rejection] = {}
    pending: list[Signed] = []
    pending_at: list[int] = []

    def defer(public_key: bytes, signature: bytes, payload: bytes) -> bool:
        pending.append((public_key, signature, payload))
        return True

    for i in np.flatnonzero(~fast).tolist():
        waiting = len(pending)
        verdicts[i] = validate(data[starts[i] : ends[i]], policy, now_ms, defer)
        if len(pending) != waiting:
            pending_at.append(i)
    buffer, p0, pe = scan.buffer, scan.payload_start, scan.payload_end
    for i in np.flatnonzero(fast & scan.signed).tolist():
        start, end, key = int(p0[i]), int(pe[i]), int(scan.public_key_start[i])
        pending.append((buffer[key : key + 32], buffer[end + 2 : end + 66], buffer[start:end]))
        pending_at.append(i)
    ids = np.empty((n, 2), dtype="<u8")
    ids[:, 0], ids[:, 1] = scan.u64[p0 + PACKET_ID_AT], scan.u64[p0 + PACKET_ID_AT + 8]
    ids = ids.view(np.uint8)
    for i, ok in zip(pending_at, verify_all(pending), strict=True):
        if not ok:  # a later check's verdict: its packet_id is the packet's
            verdict = verdicts.get(i)
            if verdict is None:
                packet_id = ids[i].tobytes()
            elif type(verdict) is Accepted:
                packet_id = verdict.packet.packet_id
            else:
                packet_id = verdict.packet_id
            verdicts[i] = _bad_signature(SIGNATURE_BYTES, PUBLIC_KEY_BYTES, packet_id or None)
    valid = fast.copy()
    rejections = []
    for i in sorted(verdicts):
        verdict = verdicts[i]
        if type(verdict) is Accepted:
            valid[i] = True
            ids[i] = np.frombuffer(verdict.packet.packet_id, dtype=np.uint8)
        else:
            valid[i] = False
            rejections.append((i, verdict))
    rows = np.flatnonzero(valid)
    payloads = [buffer[a:b] for a, b in zip(p0[rows].tolist(), pe[rows].tolist(), strict=True)]
    for i, verdict in verdicts.items():
        if type(verdict) is Accepted:
            payloads[int(np.searchsorted(rows, i))] = verdict.payload
    return BatchVerdicts(valid, ids[rows], payloads, rejections)


def validate_records(
    records: Sequence[bytes],
    policy: ValidationPolicy,
    now_ms: int,
    verify_all: Callable[[list[Signed]], list[bool]] = verify_many,
) -> BatchVerdicts:
    """:func:`validate_many` for a list of records."""
    lengths = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    ends = np.cumsum(lengths)
    return validate_many(b"".join(records), ends - lengths, ends, policy, now_ms, verify_all)


def _check_keys_and_ids(scan: ScannedRecords, fast: np.ndarray, registry) -> None:
    """Clears ``fast`` where the node id is not SHA-256(public_key)[:16], the key is not in
    the registry, or the template or approach id breaks its rule; each distinct key and id
    is checked once, by the per-record path's own functions."""
    rows = np.flatnonzero(fast)
    if not len(rows):
        return
    keys_at = scan.public_key_start[rows]
    codes, first, good = scan.group(keys_at, 32)
    keys = [scan.bytes_at(int(keys_at[f]), 32) for f in first.tolist()]
    expected = np.frombuffer(b"".join(map(_node_id_of, keys)), dtype="<u8").reshape(-1, 2)
    node_at = scan.payload_start[rows] + NODE_ID_AT
    good &= scan.u64[node_at] == expected[codes, 0]
    good &= scan.u64[node_at + 8] == expected[codes, 1]
    if registry is not None:
        good &= np.array([key in registry for key in keys])[codes]
    for (start, length), rule in (
        (scan.template_id, TEMPLATE_ID_RE),
        (scan.approach_id, APPROACH_ID_RE),
    ):
        start, length = start[rows], length[rows]
        codes, first, same = scan.group(start, length)
        allowed = [
            _id_allowed(scan.bytes_at(int(start[f]), int(length[f])), rule) for f in first.tolist()
        ]
        good &= same & np.array(allowed)[codes]
    fast[rows] = good


def _id_allowed(raw: bytes, rule) -> bool:
    try:
        return rule.fullmatch(raw.decode()) is not None
    except UnicodeDecodeError:
        return False
