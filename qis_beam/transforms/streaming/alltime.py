"""All-time (continuous) synthesis per address: a stateful DoFn in the global window.

Per packet the DoFn appends the packet's payload to a bag (a blind write) and updates one
small counter; the folded ``Synthesis`` (``qis.v1.SynthesisState``, versioned) is decoded,
updated and re-encoded only when the timer fires (at most once per ``--emit-every`` of event
time) or when the bag reaches ``PENDING_CAP_BYTES``. Work per packet is therefore O(1)
amortised, and no state value grows with traffic x TTL: the synthesis is bounded per address
(qis_beam/synthesis), the bag by ``PENDING_CAP_BYTES`` (on Flink a bag is one RocksDB value). Bag
entries are the validated ``qis.v1.OutcomePacket`` bytes, the wire contract's own versioned
encoding; nothing is pickled.

One timer spec multiplexes emission and expiry (beam-facts.md: timers of different specs do
not fire in order in batch). When it fires the DoFn folds the bag, emits a snapshot if
anything changed since the last one, and otherwise re-arms at last event + ``--state-ttl``;
an address idle that long emits its final snapshot (``is_last``) and is forgotten.

State cells keep the names and encodings of the previous version (synthesis, snapshots,
dirty, next_emit_ms, timer_at_ms), so a savepoint of it restores here; ``pending`` and
``pending_bytes`` are new and start empty (``last_event_ms`` is now read from the synthesis).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.transforms import userstate, window
from apache_beam.transforms.timeutil import TimeDomain

from qis_beam.partials import add_packet
from qis_beam.settings import StreamSettings
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.deadletters import counter
from qis_beam.transforms.streaming.common import PacketInfo, ms_of, ts_of
from qis_beam.transforms.streaming.sizes import state_size
from qis_beam.transforms.synthesize import synthesis_record
from qis_beam.wire import decode_packet, iter_packets

# Payload bytes buffered per address before they are folded without waiting for the timer:
# bounds the bag (~60 payloads) while keeping the decode/encode of the synthesis rare.
PENDING_CAP_BYTES = 8 * 1024

AddressPayload = tuple[str, bytes]


def fold_payloads(synthesis: Synthesis, payloads: Iterable[bytes]) -> int:
    """Fold validated packet payloads into ``synthesis``; returns how many."""
    n = 0
    for packet in iter_packets(payloads):
        add_packet(synthesis, packet)
        n += 1
    return n


class _KeyByAddressFn(beam.DoFn):
    def process(self, info: PacketInfo) -> Iterator[AddressPayload]:
        payload = info[0]
        yield decode_packet(payload).semantic_address.hex(), payload


class _AllTimeSnapshotFn(beam.DoFn):
    SYNTHESIS = userstate.ReadModifyWriteStateSpec("synthesis", BytesCoder())
    PENDING = userstate.BagStateSpec("pending", BytesCoder())  # payloads not folded yet
    PENDING_BYTES = userstate.ReadModifyWriteStateSpec("pending_bytes", VarIntCoder())
    SNAPSHOTS = userstate.ReadModifyWriteStateSpec("snapshots", VarIntCoder())  # emitted so far
    DIRTY = userstate.ReadModifyWriteStateSpec("dirty", VarIntCoder())  # folded, not emitted
    NEXT_EMIT = userstate.ReadModifyWriteStateSpec("next_emit_ms", VarIntCoder())
    TIMER_AT = userstate.ReadModifyWriteStateSpec("timer_at_ms", VarIntCoder())
    # Written by the previous version only (now read from the synthesis): cleared at expiry
    # so addresses restored from its savepoints leave nothing behind.
    LEGACY_LAST_EVENT = userstate.ReadModifyWriteStateSpec("last_event_ms", VarIntCoder())
    WAKE = userstate.TimerSpec("wake", TimeDomain.WATERMARK)  # emission and expiry, multiplexed

    def __init__(self, stream: StreamSettings, params: SynthesisParams):
        self._emit_every = stream.emit_every_ms
        self._ttl = stream.state_ttl_ms
        self._params = params

    def process(
        self,
        element: AddressPayload,
        ts=beam.DoFn.TimestampParam,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        pending=beam.DoFn.StateParam(PENDING),
        pending_bytes=beam.DoFn.StateParam(PENDING_BYTES),
        dirty=beam.DoFn.StateParam(DIRTY),
        next_emit=beam.DoFn.StateParam(NEXT_EMIT),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        wake=beam.DoFn.TimerParam(WAKE),
    ) -> Iterator:
        _, payload = element
        pending.add(payload)
        buffered = (pending_bytes.read() or 0) + len(payload)
        state_size("all_time.pending").update(buffered)
        if buffered >= PENDING_CAP_BYTES:
            self._fold(synthesis_state, pending)
            pending_bytes.clear()
            dirty.write(1)
        else:
            pending_bytes.write(buffered)
        # Emit no earlier than one period after the previous snapshot (throttling). A timer
        # already set at or before this period's end will see this packet.
        event_ms = ms_of(ts)
        period_end = event_ms - event_ms % self._emit_every + self._emit_every
        current = timer_at.read()
        if current is None or period_end < current:
            emit_at = max(period_end, next_emit.read() or 0)
            if current is None or emit_at < current:
                wake.set(ts_of(emit_at))
                timer_at.write(emit_at)
        return iter(())

    def _fold(self, synthesis_state, pending) -> Synthesis | None:
        """Bag + stored synthesis -> stored synthesis; None when the address has no state."""
        stored = synthesis_state.read()
        synthesis = Synthesis.from_bytes(stored) if stored else Synthesis()
        if not fold_payloads(synthesis, pending.read()):
            return synthesis if stored else None
        pending.clear()
        encoded = synthesis.to_bytes()
        synthesis_state.write(encoded)
        state_size("all_time.synthesis").update(len(encoded))
        return synthesis

    @userstate.on_timer(WAKE)
    def wake_up(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        pending=beam.DoFn.StateParam(PENDING),
        pending_bytes=beam.DoFn.StateParam(PENDING_BYTES),
        snapshots=beam.DoFn.StateParam(SNAPSHOTS),
        dirty=beam.DoFn.StateParam(DIRTY),
        next_emit=beam.DoFn.StateParam(NEXT_EMIT),
        timer_at=beam.DoFn.StateParam(TIMER_AT),
        legacy_last_event=beam.DoFn.StateParam(LEGACY_LAST_EVENT),
        wake=beam.DoFn.TimerParam(WAKE),
    ) -> Iterator:
        now_ms = ms_of(fired)
        changed = bool(pending_bytes.read()) or bool(dirty.read())
        synthesis = self._fold(synthesis_state, pending) if changed else None
        if synthesis is None:
            stored = synthesis_state.read()
            if stored is None:
                return
            synthesis = Synthesis.from_bytes(stored)
        pending_bytes.clear()
        index = snapshots.read() or 0
        expires_at = synthesis.last_event_ms + self._ttl
        if now_ms >= expires_at:
            # Idle past the TTL: a final snapshot, then the address is forgotten.
            counter("state_expired").inc()
            yield self._snapshot(key, synthesis, index, is_last=True, at_ms=now_ms)
            cells = (synthesis_state, pending, snapshots, dirty, next_emit, timer_at)
            for state in (*cells, legacy_last_event):
                state.clear()
            return
        if changed:
            yield self._snapshot(key, synthesis, index, is_last=False, at_ms=now_ms)
            snapshots.write(index + 1)
            dirty.clear()
            next_emit.write(now_ms + self._emit_every)
        wake.set(ts_of(expires_at))
        timer_at.write(expires_at)

    def _snapshot(self, address: str, synthesis: Synthesis, index: int, is_last: bool, at_ms):
        counter("synthesis_records.all_time").inc()
        pane = {"timing": "ON_TIME", "index": index, "is_last": is_last}
        record = synthesis_record(address, synthesis, self._params, None, pane)
        return window.TimestampedValue(record, ts_of(at_ms))


class AllTimeSnapshots(beam.PTransform):
    """Valid packets (payload, record, source) -> all-time snapshot records per address."""

    def __init__(self, stream: StreamSettings, params: SynthesisParams):
        super().__init__()
        self._stream = stream
        self._params = params

    def expand(self, packets):
        return (
            packets
            | "KeyByAddress" >> beam.ParDo(_KeyByAddressFn()).with_output_types(AddressPayload)
            | "GlobalStateWindow" >> beam.WindowInto(window.GlobalWindows())
            | "FoldAndSnapshot" >> beam.ParDo(_AllTimeSnapshotFn(self._stream, self._params))
        )
