"""Too-late packets: those Beam's windowed synthesis drops for arriving after window end +
allowed lateness (spec section 6). Counted and dead-lettered, never silently lost.

A DoFn cannot read the watermark, so the pipeline observes the drop instead of guessing it:
packet ids go through a GroupByKey keyed by address with the synthesis's own windows and
lateness (Beam drops exactly what the synthesis drops: its rule depends on the window and
the input watermark, not on the trigger). The trigger fires for every element, so the group
buffers nothing between panes. A stateful DoFn keyed by (packet_id, deadline) meets the
packet's "sent" mark and, unless it was dropped, its "included" mark; one timer just past the
deadline decides. Per packet: two tiny elements, one bag of two tiny marks and one timer, whatever
the traffic, window or lateness, and no raw record is held: a ``too_late`` dead letter names
the packet by ``packet_id`` and ``source`` and has ``record_b64: null`` (the packet was valid
and is in the all-time synthesis, which is fed before any windowing).
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder, TupleCoder
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Duration

from qis_beam.settings import WindowSettings
from qis_beam.transforms.deadletters import dead_letter
from qis_beam.transforms.streaming.common import PacketInfo, ms_of, ts_of
from qis_beam.transforms.streaming.sizes import state_size
from qis_beam.transforms.synthesize import window_fn
from qis_beam.validation import TOO_LATE_REASON
from qis_beam.wire import decode_packet

# (address, (packet_id, deadline_ms)): what the twin of the windowed synthesis groups.
IdsByAddress = tuple[str, tuple[bytes, int]]
# ((packet_id, deadline_ms), (included, source)): a packet's marks, keyed for the check.
# "sent" marks carry the source; "included" marks (the packet made its window) carry "".
Mark = tuple[tuple[bytes, int], tuple[bool, str]]

TOO_LATE_DETAIL = (
    "arrived after window end + allowed lateness; counted in the all-time synthesis only"
)


def deadline_ms(event_ms: int, windows: WindowSettings) -> int:
    """Watermark time after which Beam drops the packet from its last window.

    Windows of a packet expire in order, so missing the last one means missing them all.
    """
    last_window_end = event_ms - event_ms % windows.bucket_ms + windows.size_ms
    return last_window_end + windows.allowed_lateness_ms


class _IdsFn(beam.DoFn):
    def __init__(self, windows: WindowSettings):
        self._windows = windows

    def process(self, info: PacketInfo, ts=beam.DoFn.TimestampParam) -> Iterator[IdsByAddress]:
        packet = decode_packet(info[0])
        deadline = deadline_ms(ms_of(ts), self._windows)
        yield packet.semantic_address.hex(), (packet.packet_id, deadline)


class _SentFn(beam.DoFn):
    def __init__(self, windows: WindowSettings):
        self._windows = windows

    def process(self, info: PacketInfo, ts=beam.DoFn.TimestampParam) -> Iterator[Mark]:
        payload, _, source = info
        packet_id = decode_packet(payload).packet_id
        yield (packet_id, deadline_ms(ms_of(ts), self._windows)), (False, source or "")


class _IncludedFn(beam.DoFn):
    """A pane of ids that made a window -> one "included" mark per packet (last window only,
    so sliding windows give one mark per packet too)."""

    def __init__(self, windows: WindowSettings):
        self._lateness_ms = windows.allowed_lateness_ms

    def process(self, element, w=beam.DoFn.WindowParam) -> Iterator[Mark]:
        _, ids = element
        last_deadline = ms_of(w.end) + self._lateness_ms
        for packet_id, deadline in ids:
            if deadline == last_deadline:
                yield (packet_id, deadline), (True, "")


class _ReconcileFn(beam.DoFn):
    """Keyed by (packet_id, deadline): sent but never included by the deadline -> too late.

    Both marks are blind appends to one bag, and the timer reads it once: per packet two
    appends, one read and one clear, whatever order the marks come in. (Two value cells cost
    a blocking commit each per mark and a read each at the timer: 6 state round trips to the
    runner per packet instead of 4, and per-packet round trips are what a stream's speed is
    made of on Flink.)
    """

    MARK_CODER = TupleCoder((BooleanCoder(), StrUtf8Coder()))
    MARKS = userstate.BagStateSpec("marks", MARK_CODER)
    CHECK = userstate.TimerSpec("check", TimeDomain.WATERMARK)

    def process(
        self,
        element: Mark,
        marks=beam.DoFn.StateParam(MARKS),
        check=beam.DoFn.TimerParam(CHECK),
    ) -> Iterator:
        (_, deadline), mark = element
        marks.add(mark)
        state_size("too_late").update(len(self.MARK_CODER.encode(mark)))
        # Either mark arms the same timer, so no key outlives its deadline. Strictly past the
        # deadline: Beam drops when watermark > window end + lateness.
        check.set(ts_of(deadline + 1))
        return iter(())

    @userstate.on_timer(CHECK)
    def check_due(self, key=beam.DoFn.KeyParam, marks=beam.DoFn.StateParam(MARKS)) -> Iterator:
        seen = list(marks.read())
        sources = [source for included, source in seen if not included]
        if sources and not any(included for included, _ in seen):
            packet_id, _ = key
            letter = dead_letter(
                TOO_LATE_REASON, TOO_LATE_DETAIL, b"", packet_id, sources[0] or None
            )
            letter["record_b64"] = None  # raw records are not held in state (see module doc)
            yield letter
        marks.clear()


class FlagTooLate(beam.PTransform):
    """Valid packets -> ``too_late`` dead letters for those Beam's windows dropped."""

    def __init__(self, windows: WindowSettings):
        super().__init__()
        self._windows = windows

    def expand(self, packets):
        windows = self._windows
        included = (
            packets
            | "PacketIds" >> beam.ParDo(_IdsFn(windows)).with_output_types(IdsByAddress)
            | "WindowIdsLikeSynthesis"
            >> beam.WindowInto(
                window_fn(windows),
                trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                allowed_lateness=Duration(micros=windows.allowed_lateness_ms * 1000),
            )
            # Renamed from "IdsThatMadeIt": values and trigger changed (per-element panes).
            | "IdsThatMadeItEachPane" >> beam.GroupByKey()
            | "IncludedMarks" >> beam.ParDo(_IncludedFn(windows)).with_output_types(Mark)
            | "IncludedToGlobal" >> beam.WindowInto(window.GlobalWindows())
        )
        sent = packets | "SentPackets" >> beam.ParDo(_SentFn(windows)).with_output_types(Mark)
        return (
            (sent, included)
            | "SentAndIncluded" >> beam.Flatten()
            | "TypedByPacket" >> beam.Map(lambda kv: kv).with_output_types(Mark)
            # Renamed from "ReconcilePerPacket" (two value cells) and before that "Reconcile"
            # (keyed by address): its state is laid out differently.
            | "ReconcileMarksPerPacket" >> beam.ParDo(_ReconcileFn())
        )
