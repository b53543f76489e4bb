"""Streaming ingestion: validate each record, then keep the first arrival per packet_id.

Dedupe has the shape of Beam's ``DeduplicatePerKey``: the key is the packet_id itself, its
state one 16-byte payload digest and its one event-time timer expires it ``--dedupe-ttl``
after the first copy's event time. Each packet reads and writes O(1) bytes whatever the
traffic and TTL (the earlier 256 bucket keys held packed entries that every packet read,
scanned and rewrote: O(rate x TTL) per packet). In a stream nothing can be taken back, so
the first copy wins; identical later copies are duplicates, others are
``conflicting_duplicate`` dead letters (spec section 4).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import userstate, window
from apache_beam.transforms.timeutil import TimeDomain

from qis_beam.settings import StreamSettings
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter
from qis_beam.transforms.streaming.common import ByPacketId, ms_of, ts_of
from qis_beam.transforms.streaming.sizes import state_size
from qis_beam.validation import DUPLICATE_REASON, Rejection, ValidationPolicy, validate
from qis_beam.wire import CORRUPT_TAIL_REASON, split_corrupt_tail

DUPLICATES = "duplicates"


def payload_digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class _ValidateRecordFn(beam.DoFn):
    def __init__(self, policy: ValidationPolicy):
        self._policy = policy

    def process(self, element: tuple[bytes, str]) -> Iterator:
        record, source = element
        counter("records_in").inc()
        source, tail_detail = split_corrupt_tail(source)
        if tail_detail is not None:  # a replayed shard's unframable tail (qis_beam.wire)
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(CORRUPT_TAIL_REASON, tail_detail, record, source=source)
            )
            return
        verdict = validate(record, self._policy)
        if isinstance(verdict, Rejection):
            yield TaggedOutput(
                DEAD_LETTERS,
                dead_letter(verdict.reason, verdict.detail, record, verdict.packet_id, source),
            )
            return
        yield window.TimestampedValue(
            (verdict.packet.packet_id, (verdict.payload, record, source)),
            ts_of(verdict.packet.event_time_ms),
        )


class _FirstArrivalFn(beam.DoFn):
    """Keyed by packet_id: the first copy wins until its event time + ``dedupe_ttl``."""

    # A bag holding at most one digest: a first write is then one append, where a value cell
    # sends a clear and an append per packet. (Value cells are bags in the Fn API, so state
    # written by the value-cell version of this step restores here unchanged.)
    DIGEST = userstate.BagStateSpec("digest", BytesCoder())
    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, dedupe_ttl_ms: int):
        self._ttl_ms = dedupe_ttl_ms

    def process(
        self,
        element: ByPacketId,
        ts=beam.DoFn.TimestampParam,
        digest_state=beam.DoFn.StateParam(DIGEST),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator:
        packet_id, (payload, record, source) = element
        digest = payload_digest(payload)
        kept = next(iter(digest_state.read()), None)
        if kept is None:
            digest_state.add(digest)
            state_size("dedupe").update(len(digest))
            # A copy that is already older than the TTL sets a timer in the past: it
            # fires at the next watermark step, so no key outlives its horizon.
            expiry.set(ts_of(ms_of(ts) + self._ttl_ms))
            counter("valid").inc()
            yield payload, record, source
        elif kept == digest:
            counter("duplicates").inc()
            yield TaggedOutput(DUPLICATES, packet_id.hex())
        else:
            detail = "same packet_id as an earlier packet with another payload, which is kept"
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(DUPLICATE_REASON, detail, record, packet_id, source)
            )

    @userstate.on_timer(EXPIRY)
    def expire(self, digest_state=beam.DoFn.StateParam(DIGEST)):
        digest_state.clear()


class IngestStream(beam.PTransform):
    """(record, source) -> (payload, record, source) of valid first arrivals, dead letters
    and the packet_ids of duplicate copies (for exact accounting where counters are not)."""

    def __init__(self, policy: ValidationPolicy, stream: StreamSettings):
        super().__init__()
        self._policy = policy
        self._stream = stream

    def expand(self, records):
        validated = records | "Validate" >> beam.ParDo(
            _ValidateRecordFn(self._policy)
        ).with_outputs(DEAD_LETTERS, main="valid")
        first = (
            validated.valid
            # The typed key gives the stateful step BytesCoder keys on every runner.
            | "KeyByPacketId" >> beam.Map(lambda kv: kv).with_output_types(ByPacketId)
            | "GlobalDedupeWindow" >> beam.WindowInto(window.GlobalWindows())
            # Renamed from "FirstArrival" (bucket keys): its state is keyed differently.
            | "FirstArrivalPerPacket"
            >> beam.ParDo(_FirstArrivalFn(self._stream.dedupe_ttl_ms)).with_outputs(
                DEAD_LETTERS, DUPLICATES, main="packets"
            )
        )
        dead = (validated[DEAD_LETTERS], first[DEAD_LETTERS]) | "MergeDeadLetters" >> beam.Flatten()
        return first.packets, dead, first[DUPLICATES]
