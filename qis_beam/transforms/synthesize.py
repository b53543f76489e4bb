"""Synthesis by address in event-time windows and over all time (spec sections 5-6).

Input of every transform here: ``(address_hex, Synthesis)`` partials timestamped in event
time. Backfill folds whole packet lists into one partial per (address, bucket); streaming
sends one-packet partials. Windows merge partials with one CombineFn over the shared,
Beam-free :class:`~qis_beam.synthesis.Synthesis`, so both paths compute the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam import coders
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfoTiming

from qis_beam.partials import fold_by_bucket
from qis_beam.settings import WindowSettings
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.deadletters import counter

Partial = tuple[str, Synthesis]


class SynthesisCoder(coders.Coder):
    """Synthesis <-> its explicit, versioned encoding (``qis.v1.SynthesisState``)."""

    def encode(self, value: Synthesis) -> bytes:
        return value.to_bytes()

    def decode(self, encoded: bytes) -> Synthesis:
        return Synthesis.from_bytes(encoded)

    def is_deterministic(self) -> bool:
        return False  # a value coder only: never a key

    def to_type_hint(self):
        return Synthesis


coders.registry.register_coder(Synthesis, SynthesisCoder)


class MergeSynthesesFn(beam.CombineFn):
    """Merges partial syntheses; never mutates its inputs (they may feed other branches)."""

    def create_accumulator(self) -> Synthesis:
        return Synthesis()

    def add_input(self, accumulator: Synthesis, partial: Synthesis) -> Synthesis:
        return accumulator.merge(partial)

    def merge_accumulators(self, accumulators) -> Synthesis:
        merged = Synthesis()
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: Synthesis) -> Synthesis:
        return accumulator

    def get_accumulator_coder(self) -> coders.Coder:
        return SynthesisCoder()  # the versioned encoding, not a pickle


class _FoldPacketListsFn(beam.DoFn):
    """A list of payloads -> one partial per (address, bucket), stamped at the bucket start."""

    def __init__(self, bucket_ms: int):
        self._bucket_ms = bucket_ms

    def process(self, payloads: list[bytes]) -> Iterator[window.TimestampedValue]:
        for (address, bucket_start_ms), partial in fold_by_bucket(
            payloads, self._bucket_ms
        ).items():
            yield window.TimestampedValue(
                (address, partial), Timestamp(micros=bucket_start_ms * 1000)
            )


class FoldPacketLists(beam.PTransform):
    def __init__(self, windows: WindowSettings):
        super().__init__()
        self._bucket_ms = windows.bucket_ms

    def expand(self, packet_lists):
        return packet_lists | "FoldBuckets" >> beam.ParDo(
            _FoldPacketListsFn(self._bucket_ms)
        ).with_output_types(tuple[str, Synthesis])


_TIMING = {
    PaneInfoTiming.EARLY: "EARLY",
    PaneInfoTiming.ON_TIME: "ON_TIME",
    PaneInfoTiming.LATE: "LATE",
    PaneInfoTiming.UNKNOWN: "UNKNOWN",
}


def synthesis_record(
    address: str,
    synthesis: Synthesis,
    params: SynthesisParams,
    window_bounds: tuple[int, int] | None,
    pane: dict[str, Any],
) -> dict[str, Any]:
    """One output record (spec section 7); all-time records have null window bounds."""
    record = {
        "address": address,
        "template_id": synthesis.template_id,
        "window_start_ms": window_bounds[0] if window_bounds else None,
        "window_end_ms": window_bounds[1] if window_bounds else None,
        "pane": pane,
    }
    stats = synthesis.extract(params)
    if stats.get("suppressed"):
        # Privacy guard: only address, window, pane and the two counts survive.
        del record["template_id"]
    record.update(stats)
    return record


# A bounded run fires each window exactly once, after all its input: that pane is final,
# though the batch runners leave is_last unset. Records say so explicitly.
FINAL_PANE = {"timing": "ON_TIME", "index": 0, "is_last": True}


class _FormatWindowedFn(beam.DoFn):
    def __init__(self, params: SynthesisParams):
        self._params = params

    def process(
        self, element: Partial, w=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam
    ) -> Iterator[dict]:
        address, synthesis = element
        bounds = (w.start.micros // 1000, w.end.micros // 1000)
        pane_info = {"timing": _TIMING[pane.timing], "index": pane.index, "is_last": pane.is_last}
        counter("synthesis_records.windowed").inc()
        yield synthesis_record(address, synthesis, self._params, bounds, pane_info)


class _FormatAllTimeFn(beam.DoFn):
    def __init__(self, params: SynthesisParams):
        self._params = params

    def process(self, element: Partial) -> Iterator[dict]:
        address, synthesis = element
        counter("synthesis_records.all_time").inc()
        yield synthesis_record(address, synthesis, self._params, None, dict(FINAL_PANE))


class _KeyByWindowFn(beam.DoFn):
    """Bounded input: (address, partial) -> ("address|start|end", partial) per window.

    Batch has no late data and fires each window once, so windows can be grouping keys in
    the global window; Beam's windowed GroupByKey would run its trigger machinery per
    element for nothing (a fifth of a backfill's time). The windows come from the same
    WindowFn the streaming path uses.
    """

    def __init__(self, windows: WindowSettings):
        self._window_fn = window_fn(windows)

    def process(self, element: Partial, ts=beam.DoFn.TimestampParam) -> Iterator[Partial]:
        address, partial = element
        for w in self._window_fn.assign(window.WindowFn.AssignContext(ts)):
            yield f"{address}|{w.start.micros // 1000}|{w.end.micros // 1000}", partial


class _FormatKeyedWindowFn(beam.DoFn):
    def __init__(self, params: SynthesisParams):
        self._params = params

    def process(self, element: Partial) -> Iterator[dict]:
        key, synthesis = element
        address, start_ms, end_ms = key.split("|")
        counter("synthesis_records.windowed").inc()
        bounds = (int(start_ms), int(end_ms))
        yield synthesis_record(address, synthesis, self._params, bounds, dict(FINAL_PANE))


def window_fn(windows: WindowSettings):
    if windows.period_ms:
        return window.SlidingWindows(windows.size_ms / 1000, windows.period_ms / 1000)
    return window.FixedWindows(windows.size_ms / 1000)


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


class SynthesizeWindows(beam.PTransform):
    """Partials -> one record per (address, window, pane); the transform both modes share."""

    def __init__(
        self,
        windows: WindowSettings,
        params: SynthesisParams,
        streaming: bool,
        hot_key_fanout: int = 0,
    ):
        super().__init__()
        self._windows = windows
        self._params = params
        self._streaming = streaming
        self._fanout = hot_key_fanout

    def expand(self, partials):
        merge = beam.CombinePerKey(MergeSynthesesFn())
        if not self._streaming:
            if self._fanout > 1:
                merge = merge.with_hot_key_fanout(self._fanout)
            return (
                partials
                | "KeyByWindow"
                >> beam.ParDo(_KeyByWindowFn(self._windows)).with_output_types(
                    tuple[str, Synthesis]
                )
                | "MergePerAddressWindow" >> merge.with_output_types(tuple[str, Synthesis])
                | "FormatWindowed" >> beam.ParDo(_FormatKeyedWindowFn(self._params))
            )
        windowing = beam.WindowInto(
            window_fn(self._windows),
            trigger=streaming_trigger(self._windows),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=Duration(micros=self._windows.allowed_lateness_ms * 1000),
        )
        return (
            partials
            | "WindowByEventTime" >> windowing
            | "MergePerAddressWindow" >> merge.with_output_types(tuple[str, Synthesis])
            | "FormatWindowed" >> beam.ParDo(_FormatWindowedFn(self._params))
        )


class SynthesizeAllTime(beam.PTransform):
    """Bounded input: partials -> one all-time record per address (global window)."""

    def __init__(self, params: SynthesisParams, hot_key_fanout: int = 0):
        super().__init__()
        self._params = params
        self._fanout = hot_key_fanout

    def expand(self, partials):
        merge = beam.CombinePerKey(MergeSynthesesFn())
        if self._fanout > 1:
            merge = merge.with_hot_key_fanout(self._fanout)
        return (
            partials
            | "GlobalWindow" >> beam.WindowInto(window.GlobalWindows())
            | "MergePerAddress" >> merge.with_output_types(tuple[str, Synthesis])
            | "FormatAllTime" >> beam.ParDo(_FormatAllTimeFn(self._params))
        )
