"""The qis.v1 wire format of spec sections 2-4 in one place.

Outcome names and scores (from the proto enum), the id rules and their regexes, the schema
version, time constants, the one way records are decoded (one error type, ``WireError``,
for every kind of malformed input) and the rule for a shard tail that cannot be framed.
Everything else imports these names instead of restating them.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterable, Iterator

import numpy as np
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


# --- many records at once (the backfill's hot path) ---------------------------------------
#
# A batch of records is decoded column by column with numpy when each record has the shape
# protobuf serialisers give a well-formed packet: Envelope ``payload [signature of 64 bytes]
# public_key of 32 bytes``; OutcomePacket fields in field-number order, each at most once:
# ``schema_version`` 1, 16-byte ids, a 32-byte address, template and approach ids of 1-64
# bytes, a one-byte outcome type, optional delta, confidence and sample count, an event time
# and optional emit time below 2**56, map entries as (key, value) with ASCII keys, a packed
# embedding. Protobuf parses such a record to exactly these values. Every other record,
# malformed or not, is only flagged (``ok`` False) for the per-record decoders above.

_PAD = 1024  # zero bytes after a batch: reads a little past a record stay inside it
_HIGH = np.uint64(0x8080808080808080)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
# _KEEP[k + 256]: the low k bytes of a word (none for k <= 0, all 8 from k = 8 on)
_KEEP = np.array([(1 << (8 * min(max(k, 0), 8))) - 1 for k in range(-256, 256)], np.uint64)
_U32 = np.uint64(0xFFFFFFFF)
_OUTCOME_BYTE = np.isin(np.arange(256), [t for t in OUTCOME_NAMES if t < 0x80])
HEAD_BYTES = 72  # fields 1-4; packet_id, node_id and address at payload + 4, 22 and 40
PACKET_ID_AT, NODE_ID_AT, ADDRESS_AT = 4, 22, 40
# Odd multipliers that mix a string's words into one key (grouping is then verified).
_MIX = np.array(
    [(0x9E3779B97F4A7C15 + 2 * k * 0x632BE59BD9B4E019) % (1 << 64) for k in range(9)], np.uint64
)


class Words:
    """``words[offsets]``: the 8 bytes from each offset of ``buffer`` as a little-endian uint64
    (gathered as opaque 8-byte items: twice as fast as through a strided uint64 view)."""

    def __init__(self, buffer: bytes):
        self._items = np.ndarray((len(buffer) - 7,), dtype="V8", buffer=buffer, strides=(1,))

    def __getitem__(self, offsets: np.ndarray) -> np.ndarray:
        return self._items[offsets].view("<u8")


@dataclasses.dataclass
class ScannedRecords:
    """Columns of n records (see above). Offsets index the batch; values hold only where
    ``ok``; absent optional fields hold their proto3 defaults."""

    buffer: bytes  # the records back to back, then _PAD zero bytes
    ok: np.ndarray
    payload_start: np.ndarray
    payload_end: np.ndarray
    signed: np.ndarray  # a 64-byte signature at payload_end + 2 (else none)
    public_key_start: np.ndarray  # 32 bytes
    template_id: tuple[np.ndarray, np.ndarray]  # (start, length)
    approach_id: tuple[np.ndarray, np.ndarray]
    outcome_type: np.ndarray
    outcome_delta: np.ndarray
    confidence: np.ndarray
    event_time_ms: np.ndarray
    emit_time_ms: np.ndarray
    metrics: np.ndarray  # map entries on the wire (so at least its distinct keys)
    metrics_finite: np.ndarray  # every entry's value is finite
    embedding: np.ndarray  # context_embedding values
    embedding_finite: np.ndarray

    def __post_init__(self):
        buffer = self.buffer
        self.u8 = np.frombuffer(buffer, dtype=np.uint8)
        # The 8 bytes from each offset, little-endian: one gather reads a whole word.
        self.u64 = Words(buffer)

    def words(self, start: np.ndarray, length: np.ndarray | int) -> list[np.ndarray]:
        """The bytes ``[start, start + length)`` of each row as little-endian words, zero
        past the end (as many words as the longest needs)."""
        width = (int(np.max(length)) if len(length) else 0) if np.ndim(length) else length
        out = []
        for at in range(0, width, 8):  # lengths are below 256 here
            out.append(self.u64[start + at] & _KEEP[length + (256 - at)])
        return out

    def group(self, start: np.ndarray, length: np.ndarray | int) -> tuple[np.ndarray, ...]:
        """``(codes, first, same)`` of equal byte strings: rows with equal strings share a
        code, ``first[code]`` is one of its rows; ``same`` False marks the (improbable) rows
        whose string differs from their group's, to be handled by the caller."""
        words = self.words(start, length)
        key = np.zeros(len(start), dtype=np.uint64) + np.asarray(length, dtype=np.uint64)
        key *= _MIX[-1]
        for word, mix in zip(words, _MIX, strict=False):
            key += word * mix
        order = np.argsort(key)
        key = key[order]
        new = np.empty(len(key), dtype=bool)
        new[:1] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        codes = np.empty(len(key), dtype=np.int64)
        codes[order] = np.cumsum(new) - 1
        first = order[new]
        same = np.ones(len(start), dtype=bool)
        rep = first[codes]
        if np.ndim(length):
            same &= length == length[rep]
        for word in words:
            same &= word == word[rep]
        return codes, first, same

    def bytes_at(self, start: int, length: int) -> bytes:
        return self.buffer[start : start + length]


@np.errstate(invalid="ignore")  # rows not read hold any bits, signalling NaNs among them
def scan_records(data: bytes, starts: np.ndarray, ends: np.ndarray) -> ScannedRecords:
    """Columns of the records ``data[starts[i]:ends[i]]`` (int64 offsets, see above)."""
    buffer = data + bytes(_PAD)
    u8 = np.frombuffer(buffer, dtype=np.uint8)
    u64 = Words(buffer)
    ok = u8[starts] == 0x0A
    # Envelope: the payload (its length in one or two bytes), then the rest.
    b1, b2 = u8[starts + 1].astype(np.int64), u8[starts + 2].astype(np.int64)
    two = b1 >= 0x80
    ok &= ~two | (b2 < 0x80)
    p0 = starts + 2 + two
    pe = p0 + np.where(two, (b1 & 0x7F) | (b2 << 7), b1)
    tail = ends - pe
    signed = tail == 100
    ok &= signed | (tail == 34)
    pe = np.where(ok, pe, p0)
    key_tag = pe + 66 * signed
    ok &= (u8[key_tag] == 0x1A) & (u8[key_tag + 1] == 0x20)
    ok &= ~signed | ((u8[pe] == 0x12) & (u8[pe + 1] == 0x40))
    # Payload: fields 1-4, template_id, approach_id, outcome_type.
    ok &= (u64[p0] & _U32) == 0x10120108  # 08 01 12 10: version 1, a 16-byte packet_id
    ok &= (u64[p0 + 20] & 0xFFFF) == 0x101A  # 1a 10: a 16-byte node_id
    ok &= (u64[p0 + 38] & 0xFFFF) == 0x2022  # 22 20: a 32-byte address
    r = p0 + HEAD_BYTES
    template = (r + 2, u8[r + 1].astype(np.int64))
    ok &= (u8[r] == 0x2A) & (template[1] >= 1) & (template[1] <= 64)
    r = template[0] + template[1]
    approach = (r + 2, u8[r + 1].astype(np.int64))
    ok &= (u8[r] == 0x32) & (approach[1] >= 1) & (approach[1] <= 64)
    r = approach[0] + approach[1]
    outcome = u8[r + 1]
    ok &= (u8[r] == 0x38) & _OUTCOME_BYTE[outcome]
    r += 2
    # Optional delta, confidence and sample_count; the event time; optional emit time.
    present = u8[r] == 0x41
    delta = np.where(present, u64[r + 1].view("<f8"), 0.0)
    r = r + 9 * present
    present = u8[r] == 0x4D
    confidence = (u64[r + 1] & _U32).astype(np.uint32).view("<f4").astype(np.float64)
    confidence[~present] = 0.0
    r = r + 5 * present
    _, r = _varint(u8, u64, r, 0x50, 5, ok)
    ok &= u8[r] == 0x58
    event, r = _varint(u8, u64, r, 0x58, 8, ok)
    emit, r = _varint(u8, u64, r, 0x60, 8, ok)
    r = _within(r, pe, ok)
    scanned = ScannedRecords(
        buffer, ok, p0, pe, signed, key_tag + 2, template, approach, outcome.astype(np.int64),
        delta, confidence, event.astype(np.int64), emit.astype(np.int64), None, None, None, None,
    )  # fmt: skip
    scanned.metrics, scanned.metrics_finite, r = _metrics(scanned, r, pe)
    scanned.embedding, scanned.embedding_finite, r = _embedding(scanned, r, pe)
    ok &= r == pe
    return scanned


def _within(r: np.ndarray, end: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Rows read past ``end`` are not ok; positions stay within reach of the pad."""
    ok &= r <= end
    return np.minimum(r, end)


def _varint(u8, u64, r, tag: int, width: int, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An optional varint field of at most ``width`` (<= 8) bytes; longer ones: not ok."""
    present = u8[r] == tag
    word = u64[r + 1]
    stops = ~word & _HIGH
    low = stops & (~stops + np.uint64(1))  # the lowest stop bit: bit 8 * (size - 1) + 7
    size = np.frexp(low.astype(np.float64))[1] // 8  # 0 when there is none
    ok &= ~present | ((size >= 1) & (size <= width))
    # Keep the bytes up to the stop and their low 7 bits, then pack the 7-bit groups.
    y = word & (low * np.uint64(2) - np.uint64(1)) & _LOW7
    y = (y & np.uint64(0x007F007F007F007F)) | ((y & np.uint64(0x7F007F007F007F00)) >> 1)
    y = (y & np.uint64(0x00003FFF00003FFF)) | ((y & np.uint64(0x3FFF00003FFF0000)) >> 2)
    y = (y & np.uint64(0x000000000FFFFFFF)) | ((y & np.uint64(0x0FFFFFFF00000000)) >> 4)
    return np.where(present, y, np.uint64(0)), r + present * (1 + size)


def _metrics(s: ScannedRecords, r: np.ndarray, end: np.ndarray):
    """Map entries ``0x6A size 0x0A key-length key 0x11 double`` (one-byte lengths)."""
    u8, ok = s.u8, s.ok
    count = np.zeros(len(r), dtype=np.int64)
    finite = np.ones(len(r), dtype=bool)
    keys, key_lengths = [], []
    for _ in range(MAX_METRICS + 1):
        present = ok & (u8[r] == 0x6A)
        if not present.any():
            break
        size, key_length = u8[r + 1].astype(np.int64), u8[r + 3].astype(np.int64)
        value_at = r + 5 + key_length
        good = present & (size < 0x80) & (size == key_length + 11) & (u8[r + 2] == 0x0A)
        good &= u8[value_at - 1] == 0x11
        key_length[~good] = 0
        keys.append(r + 4)
        key_lengths.append(key_length)
        ok &= good | ~present
        finite &= ~good | np.isfinite(s.u64[value_at].view("<f8"))
        count += good
        r = _within(np.where(good, r + 2 + size, r), end, ok)
    ok &= u8[r] != 0x6A  # more entries than a valid packet has: the per-record path decides
    if keys:  # ASCII keys (valid UTF-8, as protobuf requires)
        key_at, key_length = np.concatenate(keys), np.concatenate(key_lengths)
        rows = np.flatnonzero(key_length)
        high = np.zeros(len(rows), dtype=np.uint64)
        for word in s.words(key_at[rows], key_length[rows]):
            high |= word & _HIGH
        ok[rows[high != 0] % len(r)] = False
    return count, finite, r


def _embedding(s: ScannedRecords, r: np.ndarray, end: np.ndarray):
    """Optional packed floats: ``0x72 length floats`` (a length of one or two bytes)."""
    u8, ok = s.u8, s.ok
    present = ok & (u8[r] == 0x72)
    b1, b2 = u8[r + 1].astype(np.int64), u8[r + 2].astype(np.int64)
    two = b1 >= 0x80
    length = np.where(present, np.where(two, (b1 & 0x7F) | (b2 << 7), b1), 0)
    ok &= ~present | ((~two | (b2 < 0x80)) & (length % 4 == 0))
    start = r + 2 + two
    r = _within(np.where(present, start + length, r), end, ok)
    count = np.where(ok, length // 4, 0)
    finite = np.ones(len(r), dtype=bool)
    if count.any():
        rows = np.repeat(np.arange(len(r)), count)
        first = np.cumsum(count) - count
        at = np.repeat(start - 4 * first, count) + 4 * np.arange(len(rows))
        values = (s.u64[at] & _U32).astype(np.uint32).view("<f4")
        finite[rows[~np.isfinite(values)]] = False
    return count, finite, r
