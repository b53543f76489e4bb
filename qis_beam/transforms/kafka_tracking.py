"""Where the native Kafka reader stands: its restriction and its watermark.

* Restriction: one offset range per partition, ``[start, END)``, all partitions of a topic
  in one restriction. Prism (2.77) sets a stage's estimated output watermark from the
  residuals of the *last* bundle only (``engine/elementmanager.go``, "aggregated here until
  it makes a difference"), so with partitions in separate bundles a partition that ran ahead
  dragged the watermark past the others and their records were dropped as late (seen here:
  5,715 of 20,000 records on 3 partitions reached the windows). With one restriction the
  reader itself takes the minimum over partitions, on every runner.
* Positions are ``(partition, offset)``, claimed one by one, so offset gaps (compaction,
  transaction markers) are fine. Runner-initiated checkpoints (split at fraction 0) work;
  other dynamic splits are refused (the ranges' ends are unknown).
* Watermark (:class:`TopicWatermark`) = the minimum over partitions of: the latest record
  timestamp of the partition minus ``watermark_delay_ms``, capped at wall clock minus the
  delay (a forged far-future timestamp cannot push it); a partition caught up with its
  high-water offset advances to wall clock minus the delay (the idle advance of Java
  KafkaIO's ``CustomTimestampPolicyWithLimitedDelay``), so an empty or quiet partition does
  not stall the stream.
"""

from __future__ import annotations

import dataclasses
import time

from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.watermark_estimators import WatermarkEstimator
from apache_beam.utils.timestamp import Timestamp

# Exclusive end of an unbounded partition range: no Kafka offset ever reaches it.
END = 2**63 - 1

# The element: (topic, ((partition, start offset), ...)).
TopicStart = tuple[str, tuple[tuple[int, int], ...]]
# A restriction: ((partition, start, stop), ...), stop exclusive, sorted by partition.
Ranges = tuple[tuple[int, int, int], ...]


def wall_ms() -> int:
    """The wall clock in ms (the watermark's cap and a timestamp-less record's time)."""
    return int(time.time() * 1000)


# --- watermark (pure rules, then the estimator) ---------------------------------------------


def watermark_after_records(current_ms, newest_record_ms, delay_ms, now_ms):
    """A partition's watermark after reading records up to ``newest_record_ms``."""
    candidate = min(newest_record_ms, now_ms) - delay_ms
    return candidate if current_ms is None else max(current_ms, candidate)


def watermark_when_idle(current_ms, delay_ms, now_ms):
    """A caught-up partition holds nothing back beyond ``now - delay``."""
    candidate = now_ms - delay_ms
    return candidate if current_ms is None else max(current_ms, candidate)


def topic_watermark(per_partition: dict, partitions) -> int | None:
    """The minimum over partitions; None while any partition has no watermark yet."""
    values = [per_partition.get(p) for p in partitions]
    return None if not values or None in values else min(values)


class TopicWatermark(WatermarkEstimator):
    """State: ({partition: watermark ms}, ms since when every partition is idle, or None)."""

    def __init__(self, state, delay_ms: int):
        per_partition, idle_since = state or ({}, None)
        self._per_partition = dict(per_partition)
        self._idle_since_ms = idle_since
        self._partitions: tuple[int, ...] = ()
        self._delay_ms = delay_ms

    def set_partitions(self, partitions) -> None:
        """The partitions that hold the watermark back: those with offsets left to read
        (the provider that creates the estimator does not see the element)."""
        self._partitions = tuple(partitions)

    def observe_timestamp(self, timestamp: Timestamp) -> None:
        pass  # the DoFn sets the watermark per partition itself

    def current_watermark(self) -> Timestamp | None:
        ms = topic_watermark(self._per_partition, self._partitions)
        return None if ms is None else Timestamp(micros=ms * 1000)

    def get_estimator_state(self):
        return dict(self._per_partition), self._idle_since_ms

    def records_read(self, newest_by_partition: dict[int, int]) -> None:
        now = wall_ms()
        for partition, newest in newest_by_partition.items():
            self._per_partition[partition] = watermark_after_records(
                self._per_partition.get(partition), newest, self._delay_ms, now
            )
        if newest_by_partition:
            self._idle_since_ms = None

    def caught_up(self, partitions, all_idle: bool) -> int:
        """Idle advance for caught-up ``partitions``; returns ms since every partition is
        idle (0 unless ``all_idle``)."""
        now = wall_ms()
        for partition in partitions:
            self._per_partition[partition] = watermark_when_idle(
                self._per_partition.get(partition), self._delay_ms, now
            )
        if not all_idle:
            self._idle_since_ms = None
            return 0
        if self._idle_since_ms is None:
            self._idle_since_ms = now
        return now - self._idle_since_ms


# --- restriction ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    start: int
    stop: int
    last: int | None = None  # last claimed offset


class TopicOffsetsTracker(RestrictionTracker):
    """Tracks one offset range per partition; positions are ``(partition, offset)``."""

    def __init__(self, ranges: Ranges):
        self._cursors = {p: _Cursor(start, stop) for p, start, stop in ranges}
        self._checkpointed = False

    def current_restriction(self) -> Ranges:
        return tuple((p, c.start, c.stop) for p, c in sorted(self._cursors.items()))

    def next_offset(self, partition: int) -> int:
        c = self._cursors[partition]
        return c.start if c.last is None else c.last + 1

    def try_claim(self, position: tuple[int, int]) -> bool:
        partition, offset = position
        c = self._cursors[partition]
        if offset < c.start or (c.last is not None and offset <= c.last):
            raise ValueError(f"offset {offset} of partition {partition} claimed out of order")
        if offset >= c.stop:
            return False
        c.last = offset
        return True

    def try_split(self, fraction_of_remainder):
        # Only checkpoints (split where reading stands): the ranges' ends are unknown.
        if fraction_of_remainder > 0 or self._checkpointed:
            return None
        primary, residual = [], []
        for p, c in sorted(self._cursors.items()):
            at = self.next_offset(p)
            primary.append((p, c.start, at))
            residual.append((p, at, c.stop))
            c.stop = at
        self._checkpointed = True
        return tuple(primary), tuple(residual)

    def check_done(self) -> None:
        left = {p: (self.next_offset(p), c.stop) for p, c in self._cursors.items()}
        unread = {p: r for p, r in left.items() if r[0] < r[1]}
        if unread:
            raise ValueError(f"partition ranges not fully claimed: {unread}")

    def current_progress(self) -> RestrictionProgress:
        # A plain fraction: Prism asks slow bundles for splits, and the SDK's split
        # arithmetic turned the work-based form into NaN here ("cannot convert float NaN").
        if not self.is_bounded():
            return RestrictionProgress(fraction=0.0)  # an endless range is never further on
        done = sum(self.next_offset(p) - c.start for p, c in self._cursors.items())
        total = sum(c.stop - c.start for c in self._cursors.values())
        return RestrictionProgress(fraction=done / total if total else 1.0)

    def is_bounded(self) -> bool:
        return all(c.stop < END for c in self._cursors.values())


class TrackerAccess:
    """Partition bookkeeping over the SDK's thread-safe tracker view (which exposes only
    try_claim, current_restriction and defer_remainder)."""

    def __init__(self, view):
        self._view = view
        self._next: dict[int, int] = {p: start for p, start, _ in view.current_restriction()}
        self._closed: set[int] = set()  # ranges that refused a claim (split or bounded)

    def ranges(self) -> Ranges:
        return self._view.current_restriction()

    def stop_of(self, partition: int) -> int:
        return next(stop for p, _, stop in self.ranges() if p == partition)

    def next_offset(self, partition: int) -> int:
        """The offset after the last claimed one (what a group commits)."""
        return self._next[partition]

    def open_partitions(self) -> list[int]:
        return [p for p, _, stop in self.ranges() if p not in self._closed and self._next[p] < stop]

    def try_claim(self, position: tuple[int, int]) -> bool:
        if self._view.try_claim(position):
            self._next[position[0]] = position[1] + 1
            return True
        self._closed.add(position[0])
        return False

    def finish(self) -> None:
        """Ends the restriction: claims each open range's last position."""
        for p in self.open_partitions():
            self._view.try_claim((p, self.stop_of(p) - 1))
            self._closed.add(p)

    def defer_remainder(self, delay=None) -> None:
        self._view.defer_remainder(delay)
