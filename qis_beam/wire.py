"""The qis.v1 wire format of spec sections 2-4 in one place.

Outcome names and scores (from the proto enum), the id rules and their regexes, the schema
version, time constants, the one way records are decoded (one error type, ``WireError``,
for every kind of malformed input) and the rule for a shard tail that cannot be framed.
Everything else imports these names instead of restating them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from qis_beam.proto import packet_pb2

Envelope = packet_pb2.Envelope
OutcomePacket = packet_pb2.OutcomePacket

SCHEMA_VERSION = 1

# Time constants (milliseconds).
SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
# Default --max-clock-skew (spec section 4): validation and the senders that clamp to it.
DEFAULT_MAX_CLOCK_SKEW_MS = 5 * MINUTE_MS

# Id rules (spec section 2).
PACKET_ID_BYTES = 16
NODE_ID_BYTES = 16
ADDRESS_BYTES = 32
TEMPLATE_ID_RE = re.compile(r"[a-z0-9_.:/-]{1,64}")
APPROACH_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.:=/+-]{0,63}")
MAX_METRICS = 8
MAX_EMBEDDING = 64

# Outcome types, named as the proto enum names them (OUTCOME_TYPE_UNSPECIFIED is invalid).
_ENUM = packet_pb2.OutcomeType
OUTCOME_NAMES: dict[int, str] = {v.number: v.name for v in _ENUM.DESCRIPTOR.values if v.number != 0}
OPEN = _ENUM.Value("OPEN")
# success score of each outcome type (spec section 5); OPEN carries no score.
OUTCOME_SCORES: dict[int, float | None] = {
    _ENUM.Value("RESOLVED"): 1.0,
    _ENUM.Value("PARTIAL"): 0.5,
    _ENUM.Value("CONTRADICTED"): 0.0,
    OPEN: None,
}
# Indexed by outcome type for the hot path: None for OPEN and for the invalid 0.
SCORE_BY_TYPE: tuple[float | None, ...] = tuple(
    OUTCOME_SCORES.get(t) for t in range(max(OUTCOME_SCORES) + 1)
)


# --- decoding -----------------------------------------------------------------------------


class WireError(ValueError):
    """Bytes that do not parse as a qis.v1 Envelope / OutcomePacket (spec: ``undecodable``)."""


# What upb raises on malformed input (DecodeError), on bad UTF-8 in string fields and on
# absurd nesting; all of them mean "undecodable", never a crash of the pipeline.
_PARSE_ERRORS = (DecodeError, ValueError, RuntimeError, RecursionError)


def _wire_error(error: Exception) -> WireError:
    return WireError(f"not a qis.v1 Envelope/OutcomePacket: {error}")


def decode_envelope(record: bytes) -> Envelope:
    """The ``Envelope`` of one raw record (TFRecord record, Kafka value, Pub/Sub data)."""
    try:
        return Envelope.FromString(record)
    except _PARSE_ERRORS as error:
        raise _wire_error(error) from error


def decode_packet(payload: bytes) -> OutcomePacket:
    """The ``OutcomePacket`` of an envelope's payload (the signed bytes)."""
    try:
        return OutcomePacket.FromString(payload)
    except _PARSE_ERRORS as error:
        raise _wire_error(error) from error


def decode_record(record: bytes) -> tuple[Envelope, OutcomePacket]:
    """Envelope and packet of one raw record; :class:`WireError` if either does not parse."""
    try:
        envelope = Envelope.FromString(record)
        return envelope, OutcomePacket.FromString(envelope.payload)
    except _PARSE_ERRORS as error:
        raise _wire_error(error) from error


# upb keeps what every parse allocates in the message's arena until the message is freed:
# a re-filled message is replaced after this many parses, or memory grows by about a record
# per parse (~320 MB per million records).
_RENEW_PARSES = 256


class _Scratch(threading.local):
    """One Envelope per thread, re-filled per record: its fields are read out as new bytes
    objects, and re-parsing a message is ~3x cheaper than making one (the hot path)."""

    def __init__(self):
        self.envelope = Envelope()
        self.left = _RENEW_PARSES


_scratch = _Scratch()


def _envelope() -> Envelope:
    scratch = _scratch
    scratch.left -= 1
    if scratch.left < 0:
        scratch.envelope, scratch.left = Envelope(), _RENEW_PARSES
    return scratch.envelope


def decode_signed(record: bytes) -> tuple[bytes, bytes, bytes, OutcomePacket]:
    """``(payload, signature, public_key, packet)`` of one raw record, as :func:`decode_record`
    gives them (:class:`WireError` likewise), without keeping an Envelope per record."""
    envelope = _envelope()
    try:
        envelope.ParseFromString(record)
        payload = envelope.payload
        return payload, envelope.signature, envelope.public_key, OutcomePacket.FromString(payload)
    except _PARSE_ERRORS as error:
        raise _wire_error(error) from error


def payload_of(record: bytes) -> bytes:
    """The signed payload bytes of a raw record (:class:`WireError` if it does not parse)."""
    envelope = _envelope()
    try:
        envelope.ParseFromString(record)
    except _PARSE_ERRORS as error:
        raise _wire_error(error) from error
    return envelope.payload


def iter_packets(payloads: Iterable[bytes]) -> Iterator[OutcomePacket]:
    """Each payload decoded into ONE message object that is re-filled per payload: read its
    fields before taking the next (folds of validated payloads; ~2x cheaper than
    :func:`decode_packet` per payload). :class:`WireError` if a payload does not parse."""
    packet = OutcomePacket()
    parse = packet.ParseFromString
    for i, payload in enumerate(payloads):
        if i % _RENEW_PARSES == _RENEW_PARSES - 1:  # see _RENEW_PARSES; readers are done with it
            packet = OutcomePacket()
            parse = packet.ParseFromString
        try:
            parse(payload)
        except _PARSE_ERRORS as error:
            raise _wire_error(error) from error
        yield packet


# --- corrupt shard tails ------------------------------------------------------------------

# A TFRecord shard whose framing breaks cannot be read past the break. Its rest is one dead
# letter, reason ``undecodable`` whatever its size (it is not an envelope, so the size check
# of an envelope does not apply), its raw bytes cut to this many to keep the letter small.
# Backfill (read.py) and replay (replay.py, through the stream) both apply this one rule.
MAX_CORRUPT_TAIL_BYTES = 4096
CORRUPT_TAIL_REASON = "undecodable"


def corrupt_tail(error, shard_bytes: int) -> tuple[str, bytes]:
    """``(detail, record)`` of the dead letter for a shard that stops framing.

    ``error`` is the :class:`qis_beam.tfrecords.CorruptRecordFile` that stopped the shard
    (its ``offset`` and ``rest``); ``shard_bytes`` the size of the whole shard.
    """
    detail = f"{error}; the rest of the shard ({shard_bytes - error.offset} bytes) cannot be framed"
    return detail, error.rest[:MAX_CORRUPT_TAIL_BYTES]


# Replay plays records as ``(record, source)`` stream elements; a corrupt tail travels as one
# such element whose source also carries its detail after this mark (file names never hold
# a NUL), so the streaming validation dead-letters it by the rule above, not as an envelope.
_TAIL_MARK = "\x00corrupt-tail\x00"


def corrupt_tail_source(source: str, detail: str) -> str:
    return f"{source}{_TAIL_MARK}{detail}"


def split_corrupt_tail(source: str) -> tuple[str, str | None]:
    """``(source, detail)`` of a corrupt-tail element's source; ``(source, None)`` otherwise."""
    if _TAIL_MARK not in source:
        return source, None
    source, detail = source.split(_TAIL_MARK, 1)
    return source, detail
