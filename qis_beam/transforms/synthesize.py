"""Synthesis by address in event-time windows and over all time (spec sections 5-6).

Streaming sends one-packet ``(address_hex, Synthesis)`` partials timestamped in event time
through ``SynthesizeWindows`` (:mod:`qis_beam.transforms.streaming.windowed`). The backfill's
:class:`FoldRanges` folds the kept packets of many ranges at once into partials already keyed
by (address, window) and by address, all merged by one :class:`MergePartials`. Both paths
merge with one CombineFn over the shared, Beam-free :class:`~qis_beam.synthesis.Synthesis`,
so they compute the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.transforms import window
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from qis_beam.partials import PacketColumns
from qis_beam.positions import HEADER_BYTES, frame_range, open_log, read_range, record_at
from qis_beam.settings import WindowSettings
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.deadletters import counter, distribution
from qis_beam.transforms.ingest import DROPS, RangePart, parse_range_key
from qis_beam.wire import WireError, decode_packet, payload_of, scan_records

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
        # Accumulators belong to the combine: Beam lets the first one be merged into.
        accumulators = iter(accumulators)
        merged = next(accumulators, None) or Synthesis()
        for accumulator in accumulators:
            merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator: Synthesis) -> Synthesis:
        return accumulator

    def get_accumulator_coder(self) -> coders.Coder:
        return SynthesisCoder()  # the versioned encoding, not a pickle


class _MergeOwnedPartialsFn(MergeSynthesesFn):
    """For partials that nothing else holds (FoldRanges emits each object once): the first
    partial of a key becomes its accumulator instead of being copied into an empty one."""

    def add_input(self, accumulator: Synthesis, partial: Synthesis) -> Synthesis:
        if accumulator.n_packets == 0:
            return partial
        return accumulator.merge(partial)


class _FoldRangesFn(beam.DoFn):
    """Second pass of the backfill: re-read each range, fold the packets the dedupe kept.

    A range is read in one piece and its kept records decoded column-wise
    (:func:`qis_beam.wire.scan_records`; a record of another shape is parsed by protobuf).
    Columns of the ranges of a bundle (~64 bytes a packet) are folded every ``FOLD_PACKETS``
    packets and at the end of the bundle, into partials keyed by (address, window) and by
    address: the pre-aggregation step of the merge after.

    Range groups are held until they cover ``SORTED_PACKETS`` valid records (or the bundle
    ends), then read in the event-time order of their first records, whatever order the
    shuffle delivered them in: on time-ordered logs each fold then spans a few windows and
    emits fewer partials, whether the files are parallel shards or consecutive periods. A
    range group is a few numbers and the offsets not to fold, so holding them costs little,
    and work still keeps pace with the input (a runner that splits work, like Dataflow, sees
    progress); finding a range's first event time costs one small read.
    """

    def __init__(self, windows: WindowSettings):
        self._windows = windows

    def setup(self) -> None:
        self._window_fn = window_fn(self._windows)
        self._window_keys: dict[int, list[tuple[int, int]]] = {}

    def start_bundle(self) -> None:
        self._columns = PacketColumns(self._windows.bucket_ms)
        # (path, start, end, offsets not to fold) of held ranges with kept packets
        self._ranges: list[tuple[str, int, int, np.ndarray]] = []
        self._held = 0  # their valid records

    def process(self, element: tuple[str, Iterable[RangePart]]) -> Iterator[Partial]:
        key, parts = element
        path, start = parse_range_key(key)
        end, valid, skip = None, 0, []
        for kind, count, packed in parts:
            if kind != DROPS:
                end, valid = kind, count
            skip.append(np.frombuffer(packed, dtype="<u4"))
        distribution("range_key_packets").update(valid)
        if end is not None and valid:
            self._ranges.append((path, start, end, np.concatenate(skip)))
            self._held += valid
            if self._held >= SORTED_PACKETS:
                yield from self._fold_held()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from map(_global, self._fold_held())
        yield from map(_global, self._fold())

    def _fold_held(self) -> Iterator[Partial]:
        """Read the held ranges in event-time order, folding every ``FOLD_PACKETS``."""
        self._ranges.sort(key=_first_event_order)
        for path, start, end, skip in self._ranges:
            self._add_range(path, start, end, skip)
            if len(self._columns) >= FOLD_PACKETS:
                yield from self._fold()
        self._ranges, self._held = [], 0

    def _add_range(self, path: str, start: int, end: int, skip: np.ndarray) -> None:
        data = read_range(path, start, end)
        offsets, lengths = frame_range(data)
        at = np.array(offsets, dtype=np.int64) + HEADER_BYTES
        size = np.array(lengths, dtype=np.int64)
        if len(skip):
            kept = ~np.isin(at - HEADER_BYTES, skip.astype(np.int64))
            at, size = at[kept], size[kept]
        scan = scan_records(data, at, at + size)
        self._columns.add_scanned(scan, lambda i: payload_of(data[at[i] : at[i] + size[i]]))

    def _fold(self) -> Iterator[Partial]:
        windowed, all_time = self._columns.fold()
        for (address, bucket_start_ms), partial in windowed.items():
            first, *others = self._keys_of_bucket(bucket_start_ms)
            yield window_key(address, first), partial
            for bounds in others:  # sliding windows: every emitted object is its own
                yield window_key(address, bounds), partial.copy()
        yield from all_time.items()  # keyed by the bare address

    def _keys_of_bucket(self, bucket_start_ms: int) -> list[tuple[int, int]]:
        keys = self._window_keys.get(bucket_start_ms)
        if keys is None:
            context = window.WindowFn.AssignContext(Timestamp(micros=bucket_start_ms * 1000))
            keys = self._window_keys[bucket_start_ms] = [
                (w.start.micros // 1000, w.end.micros // 1000)
                for w in self._window_fn.assign(context)
            ]
        return keys


def _first_event_order(fold_range: tuple[str, int, int, np.ndarray]) -> tuple:
    """Sort key of a range: its first record's event time, then its position; ranges whose
    first record does not parse (it was dead-lettered) go last."""
    path, start = fold_range[:2]
    with open_log(path) as handle:
        record = record_at(handle, start)
    try:
        return (0, decode_packet(payload_of(record)).event_time_ms, path, start)
    except WireError:
        return (1, 0, path, start)


def _global(value) -> WindowedValue:
    return WindowedValue(value, MIN_TIMESTAMP, (GlobalWindow(),))


FOLD_PACKETS = 1 << 20
SORTED_PACKETS = 4 * FOLD_PACKETS


def window_key(address: str, bounds: tuple[int, int]) -> str:
    """The merge key of an (address, window) partial; an all-time partial's is the address."""
    return f"{address}|{bounds[0]}|{bounds[1]}"


class FoldRanges(beam.PTransform):
    """Range groups (see :mod:`qis_beam.transforms.ingest`) -> partials keyed by
    ``"address|start|end"`` (:func:`window_key`) and by ``"address"`` (all time), in one
    PCollection: Flink's batch runner writes a stage's whole output once per output it has,
    so a second output for the few all-time partials would double what the fold writes."""

    def __init__(self, windows: WindowSettings):
        super().__init__()
        self._windows = windows

    def expand(self, ranges):
        return (
            ranges
            # The groups are a few hundred small descriptors hashed to workers by range key
            # (88/112 on Flink at parallelism 2); a Reshuffle deals them evenly (Flink
            # rebalances round-robin), so no worker folds far more ranges than another.
            | "SpreadRangeGroups" >> beam.Reshuffle()
            | "FoldKeptPackets"
            >> beam.ParDo(_FoldRangesFn(self._windows)).with_output_types(tuple[str, Synthesis])
        )


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


class _FormatPartialFn(beam.DoFn):
    """A merged ``("address|start|end" or "address", synthesis)`` -> its output record."""

    def __init__(self, params: SynthesisParams):
        self._params = params

    def process(self, element: Partial) -> Iterator[dict]:
        key, synthesis = element
        address, *bounds = key.split("|")
        if bounds:
            counter("synthesis_records.windowed").inc()
            window = (int(bounds[0]), int(bounds[1]))
        else:
            counter("synthesis_records.all_time").inc()
            window = None
        yield synthesis_record(address, synthesis, self._params, window, dict(FINAL_PANE))


def window_fn(windows: WindowSettings):
    if windows.period_ms:
        return window.SlidingWindows(windows.size_ms / 1000, windows.period_ms / 1000)
    return window.FixedWindows(windows.size_ms / 1000)


class MergePartials(beam.PTransform):
    """Bounded input: partials keyed by :func:`window_key` or by address -> one record per
    (address, window) and one all-time record per address.

    Batch has no late data and fires each window once, so windows are part of the key in the
    global window (Beam's windowed GroupByKey would run its trigger machinery for nothing).
    Combiner lifting merges the partials of a bundle before the shuffle. One merge for both
    kinds: two would mean a second shuffle and merge stage on Flink, and a Flatten (a union
    Flink runs) to bring their records to the sink.
    """

    def __init__(self, params: SynthesisParams, hot_key_fanout: int = 0):
        super().__init__()
        self._params = params
        self._fanout = hot_key_fanout

    def expand(self, partials):
        merge = beam.CombinePerKey(_MergeOwnedPartialsFn())
        if self._fanout > 1:
            merge = merge.with_hot_key_fanout(self._fanout)
        return (
            partials
            | "MergePerKey" >> merge.with_output_types(tuple[str, Synthesis])
            | "Format" >> beam.ParDo(_FormatPartialFn(self._params))
        )
