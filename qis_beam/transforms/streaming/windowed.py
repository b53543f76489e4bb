"""The windowed synthesis of a stream: one record per (address, window, pane).

Beam's trigger machinery decides the panes (after the watermark; early panes by count and/or
processing time; a late pane per packet within the allowed lateness) and drops what is too
late, exactly as before. What it no longer does is *accumulate*. An accumulating
GroupByKey re-emits every partial of the window at each pane, and portable streaming runners
(Flink, the Python SDK's portable path) do not lift combiners, so every pane re-merged the
whole window in Python: O(packets in the window) per pane, O(n^2 / early count) per window,
and a late pane per late packet. On Flink that is what made an 800k-packet stream slow down
as its windows filled.

Now the GroupByKey *discards*: a pane carries only the partials that arrived since the last
one (at most ``--early-firing-count``, one for a late pane), merged in one CombineFn call, and a
stateful DoFn keyed by (address, window) folds them into the window's synthesis, kept in its
versioned encoding, and emits it with the pane's own timing and ``is_last`` and, as index, the
count of records it emitted for the window (Beam's pane index where panes arrive in order). A
pane costs O(new packets) plus one decode and encode of a bounded synthesis, whatever the
window's size; the records are the ones the accumulating pane gave (pane contents are
cumulative; Beam fires the on-time pane even when empty, except on Prism: docs/runners.md).
The key's state is cleared one tick after window end + allowed lateness, when Beam has
dropped the window too.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Duration
from apache_beam.utils.windowed_value import PaneInfoTiming

from qis_beam.settings import WindowSettings
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.deadletters import counter
from qis_beam.transforms.streaming.common import ms_of, ts_of
from qis_beam.transforms.streaming.sizes import state_size
from qis_beam.transforms.synthesize import MergeSynthesesFn, synthesis_record, window_fn

# (address hex, window start ms): one window of one address (windows have one size).
WindowKey = tuple[str, int]
# A pane's new partials merged, with the pane's timing name and is_last.
PaneDelta = tuple[WindowKey, tuple[Synthesis, str, bool]]

_TIMING = {
    PaneInfoTiming.EARLY: "EARLY",
    PaneInfoTiming.ON_TIME: "ON_TIME",
    PaneInfoTiming.LATE: "LATE",
    PaneInfoTiming.UNKNOWN: "UNKNOWN",
}


def streaming_trigger(windows: WindowSettings):
    """After the watermark, early panes by count and/or processing time, a late pane per packet.

    Processing-time early firings exist only here: the batch runners reject them
    (beam-facts.md, apache/beam#19070), so backfill never builds this trigger.
    """
    early = []
    if windows.early_firing_count > 0:
        early.append(trigger.AfterCount(windows.early_firing_count))
    if windows.early_firing_delay_ms > 0:
        # Beam encodes this delay in whole seconds.
        seconds = max(1, round(windows.early_firing_delay_ms / 1000))
        early.append(trigger.AfterProcessingTime(seconds))
    early_trigger = trigger.AfterAny(*early) if len(early) > 1 else (early[0] if early else None)
    return trigger.AfterWatermark(early=early_trigger, late=trigger.AfterCount(1))


class _KeyByWindowFn(beam.DoFn):
    """A pane's merged new partials -> keyed by (address, window), with the pane's info."""

    def process(
        self, element: tuple[str, Synthesis], w=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam
    ) -> Iterator[PaneDelta]:
        address, delta = element
        key = (address, ms_of(w.start))
        yield key, (delta, _TIMING[pane.timing], pane.is_last)


class _AccumulatePanesFn(beam.DoFn):
    """Keyed by (address, window): the window's synthesis so far, one record per pane."""

    SYNTHESIS = userstate.ReadModifyWriteStateSpec("synthesis", BytesCoder())
    PANES = userstate.ReadModifyWriteStateSpec("panes", VarIntCoder())  # emitted so far
    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, params: SynthesisParams, windows: WindowSettings):
        self._params = params
        self._size_ms = windows.size_ms
        self._lateness_ms = windows.allowed_lateness_ms

    def process(
        self,
        element: PaneDelta,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        panes=beam.DoFn.StateParam(PANES),
        expiry=beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[dict]:
        (address, start_ms), (synthesis, timing, is_last) = element
        end_ms = start_ms + self._size_ms
        stored = synthesis_state.read()
        if stored:
            synthesis = Synthesis.from_bytes(stored).merge(synthesis)
        # The index counts the records emitted, so a higher index always holds more: where
        # a runner delivers a window's panes in order (Flink, the DirectRunner) it is Beam's
        # pane index, and where it may not (Prism, across a shuffle) the last record is
        # still the complete one.
        index = panes.read() or 0
        if is_last:  # the window's final pane: nothing more can come
            synthesis_state.clear()
            panes.clear()
        else:
            encoded = synthesis.to_bytes()
            synthesis_state.write(encoded)
            panes.write(index + 1)
            state_size("windowed.synthesis").update(len(encoded))
            # Strictly past window end + lateness: Beam has dropped the window by then.
            expiry.set(ts_of(end_ms + self._lateness_ms + 1))
        counter("synthesis_records.windowed").inc()
        pane = {"timing": timing, "index": index, "is_last": is_last}
        yield synthesis_record(address, synthesis, self._params, (start_ms, end_ms), pane)

    @userstate.on_timer(EXPIRY)
    def expire(
        self,
        synthesis_state=beam.DoFn.StateParam(SYNTHESIS),
        panes=beam.DoFn.StateParam(PANES),
    ):
        synthesis_state.clear()
        panes.clear()


class SynthesizeWindows(beam.PTransform):
    """One-packet partials (address, Synthesis) in event time -> one record per (address,
    window, pane), in the global window."""

    def __init__(self, windows: WindowSettings, params: SynthesisParams):
        super().__init__()
        self._windows = windows
        self._params = params

    def expand(self, partials):
        lateness_ms = self._windows.allowed_lateness_ms
        windowing = beam.WindowInto(
            window_fn(self._windows),
            trigger=streaming_trigger(self._windows),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
            allowed_lateness=Duration(micros=lateness_ms * 1000),
        )
        return (
            partials
            | "WindowByEventTime" >> windowing
            # Same label as the accumulating version: a savepoint's buffered partials restore
            # here and the first pane after it merges them all.
            | "MergePerAddressWindow"
            >> beam.CombinePerKey(MergeSynthesesFn()).with_output_types(tuple[str, Synthesis])
            | "KeyByWindow" >> beam.ParDo(_KeyByWindowFn()).with_output_types(PaneDelta)
            | "PanesToGlobal" >> beam.WindowInto(window.GlobalWindows())
            | "AccumulatePanes" >> beam.ParDo(_AccumulatePanesFn(self._params, self._windows))
        )
