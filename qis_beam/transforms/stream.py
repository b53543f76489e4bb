"""Streaming ingestion and continuous synthesis (spec sections 4 and 6, streaming rules).

* :class:`IngestStream` validates one record at a time, stamps valid packets with their
  event time and deduplicates them by packet_id in a stateful DoFn: the first copy to
  arrive wins (nothing can be taken back in a stream), identical later copies are counted
  as duplicates, others are ``conflicting_duplicate`` dead letters; a packet_id is
  remembered until the watermark passes its event time + ``--dedupe-ttl``.
* :class:`AllTimeSnapshots` folds every packet into per-address state (the versioned
  ``Synthesis`` encoding, never a pickle) in the global window and emits a snapshot at most
  every ``--emit-every`` of event time; an address idle for ``--state-ttl`` emits its final
  snapshot (``is_last``) and is forgotten. One timer spec multiplexes emission and expiry
  (beam-facts.md: timers of different specs do not fire in order in batch).
* :class:`FlagTooLate` finds packets that Beam's windowed aggregation drops for being later
  than window end + allowed lateness. A DoFn cannot read the watermark, so it reconciles:
  packet ids go through a GroupByKey with the same windows and lateness as the synthesis
  (so Beam drops exactly the same packets), and a stateful DoFn keyed by address compares
  what was sent with what came out once the watermark has passed each packet's deadline.
  What never came out is ``too_late``: counted, dead-lettered. It still reached the
  all-time synthesis, which is fed before any windowing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BytesCoder, PickleCoder, StrUtf8Coder, VarIntCoder
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Duration, Timestamp

from qis_beam.partials import parse_payload
from qis_beam.settings import StreamSettings, WindowSettings
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter
from qis_beam.transforms.synthesize import synthesis_record, window_fn
from qis_beam.validation import (
    DUPLICATE_REASON,
    TOO_LATE_REASON,
    Rejection,
    ValidationPolicy,
    validate,
)

DUPLICATES = "duplicates"

# A valid packet on its way: (payload, record, source)
PacketInfo = tuple[bytes, bytes, str]


def _ms(ts: Timestamp) -> int:
    return ts.micros // 1000


def _ts(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class _ValidateRecordFn(beam.DoFn):
    def __init__(self, policy: ValidationPolicy, dedupe_buckets: int):
        self._policy = policy
        self._buckets = dedupe_buckets

    def process(self, element: tuple[bytes, str]) -> Iterator:
        record, source = element
        counter("records_in").inc()
        verdict = validate(record, self._policy)
        if isinstance(verdict, Rejection):
            yield TaggedOutput(
                DEAD_LETTERS,
                dead_letter(verdict.reason, verdict.detail, record, verdict.packet_id, source),
            )
            return
        packet_id = verdict.packet.packet_id
        bucket = int.from_bytes(packet_id[:4], "big") % self._buckets
        yield window.TimestampedValue(
            (f"{bucket:05d}", (packet_id, verdict.payload, record, source)),
            _ts(verdict.packet.event_time_ms),
        )


# A dedupe entry: packet_id (16) | payload digest (16) | expiry ms (8, big-endian).
_ENTRY = 40


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def _find_entry(entries: bytes, packet_id: bytes) -> int:
    """Offset of packet_id's entry in the packed entries, or -1."""
    at = entries.find(packet_id)
    while at >= 0 and at % _ENTRY:
        at = entries.find(packet_id, at + 1)
    return at


class _FirstArrivalFn(beam.DoFn):
    """Keyed by packet_id bucket: the first copy of a packet_id wins for ``dedupe_ttl``.

    Buckets, not packet_ids, are the keys so that the number of keys with pending timers
    stays small (the DirectRunner scans every such key at each watermark step). A bucket's
    state is its entries packed in one byte string; one timer drops expired entries.
    """

    ENTRIES = userstate.ReadModifyWriteStateSpec("entries", BytesCoder())
    TIMER_AT = userstate.ReadModifyWriteStateSpec("timer_at_ms", VarIntCoder())
    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, dedupe_ttl_ms: int):
        self._ttl_ms = dedupe_ttl_ms

    def process(
        self,
        element: tuple[str, tuple[bytes, bytes, bytes, str]],
        ts=beam.DoFn.TimestampParam,
        entries_state=beam.DoFn.StateParam(ENTRIES),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator:
        _, (packet_id, payload, record, source) = element
        entries = entries_state.read() or b""
        at = _find_entry(entries, packet_id)
        if at < 0:
            expires_ms = _ms(ts) + self._ttl_ms
            entries_state.write(
                entries + packet_id + _digest(payload) + expires_ms.to_bytes(8, "big")
            )
            current = timer_at.read()
            if current is None or expires_ms < current:
                expiry.set(_ts(expires_ms))
                timer_at.write(expires_ms)
            counter("valid").inc()
            yield payload, record, source
        elif entries[at + 16 : at + 32] == _digest(payload):
            counter("duplicates").inc()
            yield TaggedOutput(DUPLICATES, packet_id.hex())
        else:
            detail = "same packet_id as an earlier packet with another payload, which is kept"
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(DUPLICATE_REASON, detail, record, packet_id, source)
            )

    @userstate.on_timer(EXPIRY)
    def expire(
        self,
        fired=beam.DoFn.TimestampParam,
        entries_state=beam.DoFn.StateParam(ENTRIES),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ):
        now_ms = _ms(fired)
        entries = entries_state.read() or b""
        kept = [
            entries[i : i + _ENTRY]
            for i in range(0, len(entries), _ENTRY)
            if int.from_bytes(entries[i + 32 : i + _ENTRY], "big") > now_ms
        ]
        timer_at.clear()
        if not kept:
            entries_state.clear()
            return
        entries_state.write(b"".join(kept))
        next_ms = min(int.from_bytes(e[32:], "big") for e in kept)
        expiry.set(_ts(next_ms))
        timer_at.write(next_ms)


class IngestStream(beam.PTransform):
    """(record, source) -> (payload, record, source) of valid first arrivals, dead letters
    and the packet_ids of duplicate copies (for exact accounting where counters are not)."""

    def __init__(self, policy: ValidationPolicy, stream: StreamSettings):
        super().__init__()
        self._policy = policy
        self._stream = stream

    def expand(self, records):
        validated = records | "Validate" >> beam.ParDo(
            _ValidateRecordFn(self._policy, self._stream.dedupe_buckets)
        ).with_outputs(DEAD_LETTERS, main="valid")
        first = (
            validated.valid
            # A typed key gives the stateful step a deterministic key coder on every runner.
            | "KeyByPacketIdBucket"
            >> beam.Map(lambda kv: kv).with_output_types(
                tuple[str, tuple[bytes, bytes, bytes, str]]
            )
            | "GlobalDedupeWindow" >> beam.WindowInto(window.GlobalWindows())
            | "FirstArrival"
            >> beam.ParDo(_FirstArrivalFn(self._stream.dedupe_ttl_ms)).with_outputs(
                DEAD_LETTERS, DUPLICATES, main="packets"
            )
        )
        dead = (validated[DEAD_LETTERS], first[DEAD_LETTERS]) | "MergeDeadLetters" >> beam.Flatten()
        return first.packets, dead, first[DUPLICATES]


class _SinglePartialFn(beam.DoFn):
    def process(self, info: PacketInfo) -> Iterator[tuple[str, Synthesis]]:
        packet = parse_payload(info[0])
        synthesis = Synthesis()
        synthesis.add(
            packet.node_id,
            packet.approach_id,
            packet.outcome_type,
            packet.outcome_delta,
            packet.confidence,
            packet.event_time_ms,
            packet.template_id,
        )
        yield packet.semantic_address.hex(), synthesis


class PacketPartials(beam.PTransform):
    """One-packet partials keyed by address hex, keeping each packet's event timestamp."""

    def expand(self, packets):
        return packets | "OnePacketPartial" >> beam.ParDo(_SinglePartialFn()).with_output_types(
            tuple[str, Synthesis]
        )


class _AllTimeSnapshotFn(beam.DoFn):
    SYNTHESIS = userstate.ReadModifyWriteStateSpec("synthesis", BytesCoder())
    SNAPSHOTS = userstate.ReadModifyWriteStateSpec("snapshots", VarIntCoder())  # emitted so far
    LAST_EVENT = userstate.ReadModifyWriteStateSpec("last_event_ms", VarIntCoder())
    DIRTY = userstate.ReadModifyWriteStateSpec("dirty", VarIntCoder())
    NEXT_EMIT = userstate.ReadModifyWriteStateSpec("next_emit_ms", VarIntCoder())
    TIMER_AT = userstate.ReadModifyWriteStateSpec("timer_at_ms", VarIntCoder())
    WAKE = userstate.TimerSpec("wake", TimeDomain.WATERMARK)  # emission and expiry, multiplexed

    def __init__(self, stream: StreamSettings, params: SynthesisParams):
        self._emit_every = stream.emit_every_ms
        self._ttl = stream.state_ttl_ms
        self._params = params

    def process(
        self,
        element: tuple[str, Synthesis],
        ts=beam.DoFn.TimestampParam,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        last_event=beam.DoFn.StateParam(LAST_EVENT),
        dirty=beam.DoFn.StateParam(DIRTY),
        next_emit=beam.DoFn.StateParam(NEXT_EMIT),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        wake=beam.DoFn.TimerParam(WAKE),
    ) -> Iterator:
        _, partial = element
        stored = synthesis_state.read()
        synthesis = Synthesis.from_bytes(stored) if stored else Synthesis()
        synthesis.merge(partial)
        synthesis_state.write(synthesis.to_bytes())
        event_ms = _ms(ts)
        last_event.write(max(event_ms, last_event.read() or 0))
        dirty.write(1)
        # Emit no earlier than one period after the previous snapshot (throttling).
        period_end = event_ms - event_ms % self._emit_every + self._emit_every
        emit_at = max(period_end, next_emit.read() or 0)
        current = timer_at.read()
        if current is None or emit_at < current:
            wake.set(_ts(emit_at))
            timer_at.write(emit_at)
        return iter(())

    @userstate.on_timer(WAKE)
    def wake_up(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        snapshots=beam.DoFn.StateParam(SNAPSHOTS),
        last_event=beam.DoFn.StateParam(LAST_EVENT),
        dirty=beam.DoFn.StateParam(DIRTY),
        next_emit=beam.DoFn.StateParam(NEXT_EMIT),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        wake=beam.DoFn.TimerParam(WAKE),
    ) -> Iterator:
        now_ms = _ms(fired)
        stored = synthesis_state.read()
        if stored is None:
            return
        index = snapshots.read() or 0
        expires_at = (last_event.read() or 0) + self._ttl
        if now_ms >= expires_at:
            # Idle past the TTL: a final snapshot, then the address is forgotten.
            counter("state_expired").inc()
            yield self._snapshot(key, stored, index, is_last=True, at_ms=now_ms)
            for state in (synthesis_state, snapshots, last_event, dirty, next_emit, timer_at):
                state.clear()
            return
        if dirty.read():
            yield self._snapshot(key, stored, index, is_last=False, at_ms=now_ms)
            snapshots.write(index + 1)
            dirty.clear()
            next_emit.write(now_ms + self._emit_every)
        wake.set(_ts(expires_at))
        timer_at.write(expires_at)

    def _snapshot(self, address: str, stored: bytes, index: int, is_last: bool, at_ms: int):
        counter("synthesis_records.all_time").inc()
        pane = {"timing": "ON_TIME", "index": index, "is_last": is_last}
        record = synthesis_record(address, Synthesis.from_bytes(stored), self._params, None, pane)
        return window.TimestampedValue(record, _ts(at_ms))


class AllTimeSnapshots(beam.PTransform):
    """Partials -> all-time snapshot records per address (global window, stateful)."""

    def __init__(self, stream: StreamSettings, params: SynthesisParams):
        super().__init__()
        self._stream = stream
        self._params = params

    def expand(self, partials):
        return (
            partials
            | "GlobalStateWindow" >> beam.WindowInto(window.GlobalWindows())
            | "FoldAndSnapshot" >> beam.ParDo(_AllTimeSnapshotFn(self._stream, self._params))
        )


def _deadline_ms(event_ms: int, windows: WindowSettings) -> int:
    """Watermark time after which Beam drops the packet from its last window."""
    last_window_end = event_ms - event_ms % windows.bucket_ms + windows.size_ms
    return last_window_end + windows.allowed_lateness_ms


class _SentFn(beam.DoFn):
    def __init__(self, windows: WindowSettings):
        self._windows = windows

    def process(self, info: PacketInfo, ts=beam.DoFn.TimestampParam) -> Iterator:
        payload, record, source = info
        packet = parse_payload(payload)
        deadline = _deadline_ms(_ms(ts), self._windows)
        yield (
            packet.semantic_address.hex(),
            ("sent", (deadline, packet.packet_id.hex(), record, source)),
        )


class _IdsFn(beam.DoFn):
    def __init__(self, windows: WindowSettings):
        self._windows = windows

    def process(self, info: PacketInfo, ts=beam.DoFn.TimestampParam) -> Iterator:
        packet = parse_payload(info[0])
        yield (
            packet.semantic_address.hex(),
            f"{packet.packet_id.hex()}|{_deadline_ms(_ms(ts), self._windows)}",
        )


class _ReconcileFn(beam.DoFn):
    """Keyed by address: sent packets vs ids the windowed GroupByKey let through."""

    SENT = userstate.BagStateSpec("sent", PickleCoder())
    INCLUDED = userstate.SetStateSpec("included", StrUtf8Coder())
    TIMER_AT = userstate.ReadModifyWriteStateSpec("timer_at_ms", VarIntCoder())
    CHECK = userstate.TimerSpec("check", TimeDomain.WATERMARK)

    def process(
        self,
        element,
        sent=beam.DoFn.StateParam(SENT),
        included=beam.DoFn.StateParam(INCLUDED),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        check=beam.DoFn.TimerParam(CHECK),
    ) -> Iterator:
        _, (kind, value) = element
        if kind == "included":
            for tag in value:
                included.add(tag)
            return
        deadline = value[0]
        sent.add(value)
        check_at = deadline + 1  # strictly past the deadline: Beam drops when wm > deadline
        current = timer_at.read()
        if current is None or check_at < current:
            check.set(_ts(check_at))
            timer_at.write(check_at)

    @userstate.on_timer(CHECK)
    def check_due(
        self,
        fired=beam.DoFn.TimestampParam,
        sent=beam.DoFn.StateParam(SENT),
        included=beam.DoFn.StateParam(INCLUDED),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        check=beam.DoFn.TimerParam(CHECK),
    ) -> Iterator:
        now_ms = _ms(fired)
        ids = set(included.read())
        pending = []
        for deadline, packet_id, record, source in sent.read():
            if deadline >= now_ms:
                pending.append((deadline, packet_id, record, source))
            elif f"{packet_id}|{deadline}" not in ids:
                detail = (
                    "arrived after window end + allowed lateness; "
                    "counted in the all-time synthesis only"
                )
                yield dead_letter(TOO_LATE_REASON, detail, record, bytes.fromhex(packet_id), source)
        sent.clear()
        included.clear()
        for entry in pending:
            sent.add(entry)
        for tag in ids:
            if int(tag.rsplit("|", 1)[1]) >= now_ms:
                included.add(tag)
        timer_at.clear()
        if pending:
            next_at = min(entry[0] for entry in pending) + 1
            check.set(_ts(next_at))
            timer_at.write(next_at)


class FlagTooLate(beam.PTransform):
    """Valid packets -> ``too_late`` dead letters for those Beam's windows dropped."""

    def __init__(self, windows: WindowSettings):
        super().__init__()
        self._windows = windows

    def expand(self, packets):
        included = (
            packets
            | "PacketIds" >> beam.ParDo(_IdsFn(self._windows)).with_output_types(tuple[str, str])
            | "WindowIdsLikeSynthesis"
            >> beam.WindowInto(
                window_fn(self._windows),
                trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(micros=self._windows.allowed_lateness_ms * 1000),
            )
            | "IdsThatMadeIt" >> beam.GroupByKey()
            | "TagIncluded"
            >> beam.MapTuple(lambda address, ids: (address, ("included", list(ids))))
            | "IncludedToGlobal" >> beam.WindowInto(window.GlobalWindows())
        )
        sent = packets | "SentPackets" >> beam.ParDo(_SentFn(self._windows))
        return (
            (sent, included)
            | "SentAndIncluded" >> beam.Flatten()
            | "TypedByAddress"
            >> beam.Map(lambda kv: kv).with_output_types(tuple[str, tuple[str, object]])
            | "Reconcile" >> beam.ParDo(_ReconcileFn())
        )


class TallyStream(beam.PTransform):
    """Counts of records, first arrivals and duplicates, as records once the stream drains.

    The BundleBasedDirectRunner loses most counter updates of streaming bundles, so a
    replay's summary is built from these instead of from Beam metrics.
    """

    def expand(self, tagged):
        records, packets, duplicates = tagged
        return (
            (
                records | "CountRecords" >> beam.Map(lambda _: ("records_in", 1)),
                packets | "CountValid" >> beam.Map(lambda _: ("valid", 1)),
                duplicates | "CountDuplicates" >> beam.Map(lambda _: ("duplicates", 1)),
            )
            | "AllTallies" >> beam.Flatten()
            | "TallyUntilDrained"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterWatermark()),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "SumTallies" >> beam.CombinePerKey(sum).with_output_types(tuple[str, int])
            | "TallyRecord" >> beam.MapTuple(lambda name, count: {"counter": name, "value": count})
        )
