"""A Python-native Kafka source: a splittable DoFn over a topic's partitions.

Beam's ``ReadFromKafka`` is cross-language: it needs the Java IO expansion service jar and a
runner that runs Java (Flink, Dataflow). Where those are missing -- Prism, a laptop without
the jars -- :class:`ReadKafkaEnvelopes` reads the same topic with confluent-kafka inside the
Python SDK harness.

* The partitions are found at run time (``ListPartitions``): one element per topic whose
  restriction is an offset range per partition, ``[start, END)``. ``start`` is the group's
  committed offset when a ``group_id`` is given and has one, else the earliest offset.
* One restriction for all partitions, not one per partition: Prism (2.77) sets a stage's
  estimated output watermark from the residuals of the *last* bundle only
  (``engine/elementmanager.go``, "aggregated here until it makes a difference"), so with
  partitions in separate bundles a partition that ran ahead dragged the watermark past
  the others and their records were dropped as late (seen here: 5,715 of 20,000 records
  on 3 partitions reached the windows). With one restriction the reader itself takes the
  minimum over partitions, on every runner.
* The DoFn assigns one consumer to every partition at its range start (kept between bundles;
  re-assigned only when a resumed restriction does not start where it stopped). It reads at
  most ``max_bundle_records`` / ``max_bundle_seconds``, then checkpoints itself with
  ``defer_remainder``: at once when it stopped for the cap, after ``poll_interval_s`` when
  nothing new came. Runner-initiated checkpoints (split at fraction 0) work too; other
  dynamic splits are refused (the ranges' ends are unknown). Positions are
  ``(partition, offset)``, claimed one by one, so offset gaps (compaction, transaction
  markers) are fine.
* Element timestamp = the Kafka record timestamp (producers set it to the packet's event
  time: ``qis_beam.transports``); a record without one gets the read time.
* Watermark (:class:`TopicWatermark`) = the minimum over partitions of: the latest record
  timestamp of the partition minus ``watermark_delay_ms``, capped at wall clock minus the
  delay (a forged far-future timestamp cannot push it); a partition caught up with its
  high-water offset advances to wall clock minus the delay (the idle advance of Java
  KafkaIO's ``CustomTimestampPolicyWithLimitedDelay``), so an empty or quiet partition does
  not stall the stream. Records older than the watermark are late data downstream.
* Bounded runs (tests, benchmarks): ``stop_when_idle_s`` ends the read once every partition
  is caught up and nothing new came for that long; ``max_records_per_partition`` bounds each
  range. The read ends by claiming each range's last position; the job then drains and
  finishes (``DONE``).
* With ``group_id``, offsets are committed when the runner finalizes a bundle (after its
  output is durable), so a restarted job goes on where the last one stopped.

Output: the raw record value bytes (``b""`` for a tombstone, which ingestion dead-letters as
undecodable). Counters (namespace ``qis_beam.kafka``): ``records_read``, ``checkpoints``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.io.watermark_estimators import WatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

NAMESPACE = "qis_beam.kafka"
# Exclusive end of an unbounded partition range: no Kafka offset ever reaches it.
END = 2**63 - 1

# The element: (topic, ((partition, start offset), ...)).
TopicStart = tuple[str, tuple[tuple[int, int], ...]]
# A restriction: ((partition, start, stop), ...), stop exclusive, sorted by partition.
Ranges = tuple[tuple[int, int, int], ...]


def _now_ms() -> int:
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
        now = _now_ms()
        for partition, newest in newest_by_partition.items():
            self._per_partition[partition] = watermark_after_records(
                self._per_partition.get(partition), newest, self._delay_ms, now
            )
        if newest_by_partition:
            self._idle_since_ms = None

    def caught_up(self, partitions, all_idle: bool) -> int:
        """Idle advance for caught-up ``partitions``; returns ms since every partition is
        idle (0 unless ``all_idle``)."""
        now = _now_ms()
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


# --- reading -------------------------------------------------------------------------------


def _consumer(bootstrap_servers: str, group_id: str | None, config: dict | None):
    from confluent_kafka import Consumer

    settings = {
        "bootstrap.servers": bootstrap_servers,
        # librdkafka wants a group even for assign(); offsets are committed only with group_id.
        "group.id": group_id or "qis-beam-native-reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        "queued.max.messages.kbytes": 32 * 1024,  # bounded prefetch
    }
    settings.update(config or {})
    return Consumer(settings)


def coordinator_not_ready(error) -> bool:
    """A group coordinator still starting (fresh broker, new group): worth a retry."""
    from confluent_kafka import KafkaError

    transient = (
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    )
    kafka_error = error.args[0]
    return kafka_error.retriable() or kafka_error.code() in transient


class _ListPartitionsFn(beam.DoFn):
    """Impulse -> (topic, ((partition, start offset), ...))."""

    def __init__(self, bootstrap_servers, topic, group_id, config, metadata_timeout_s):
        self._servers = bootstrap_servers
        self._topic = topic
        self._group_id = group_id
        self._config = config
        self._timeout_s = metadata_timeout_s

    def process(self, _) -> Iterator[TopicStart]:
        from confluent_kafka import TopicPartition

        consumer = _consumer(self._servers, self._group_id, self._config)
        try:
            partitions = self._partitions(consumer)
            starts = {
                p: consumer.get_watermark_offsets(
                    TopicPartition(self._topic, p), timeout=self._timeout_s
                )[0]
                for p in partitions
            }
            if self._group_id:
                committed = self._committed(
                    consumer, [TopicPartition(self._topic, p) for p in partitions]
                )
                for tp in committed:
                    if tp.offset >= 0:  # OFFSET_INVALID (-1001) when nothing was committed
                        starts[tp.partition] = max(starts[tp.partition], tp.offset)
        finally:
            consumer.close()
        yield self._topic, tuple((p, starts[p]) for p in partitions)

    def _committed(self, consumer, partitions):
        from confluent_kafka import KafkaException

        # A fresh broker answers NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS for a while.
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                return consumer.committed(partitions, timeout=self._timeout_s)
            except KafkaException as error:
                if not coordinator_not_ready(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _partitions(self, consumer) -> list[int]:
        # The first producer may still be creating the topic: wait for it a little.
        deadline = time.monotonic() + self._timeout_s
        while True:
            metadata = consumer.list_topics(self._topic, timeout=self._timeout_s)
            topic = metadata.topics.get(self._topic)
            if topic is not None and topic.error is None and topic.partitions:
                return sorted(topic.partitions)
            if time.monotonic() >= deadline:
                error = topic.error if topic is not None else "no metadata"
                raise RuntimeError(
                    f"Kafka topic {self._topic!r} not found on {self._servers}: {error}"
                )
            time.sleep(0.5)


# No provider given: the DoFn itself provides restrictions and watermark estimators.
_OWN_RESTRICTION = beam.DoFn.RestrictionParam()
_OWN_WATERMARK = beam.DoFn.WatermarkEstimatorParam()


class _ReadTopicFn(beam.DoFn, RestrictionProvider, WatermarkEstimatorProvider):
    """Reads a topic's partition ranges. It is its own restriction and watermark provider:
    the providers need the read's settings, which class-level parameters cannot carry."""

    def __init__(self, bootstrap_servers, group_id, config, options: dict):
        self._servers = bootstrap_servers
        self._group_id = group_id
        self._config = config
        self._delay_ms = options["watermark_delay_ms"]
        self._poll_s = options["poll_interval_s"]
        self._max_bundle_records = options["max_bundle_records"]
        self._max_bundle_s = options["max_bundle_seconds"]
        stop = options["stop_when_idle_s"]
        self._stop_when_idle_ms = None if stop is None else int(stop * 1000)
        self._metadata_timeout_s = options["metadata_timeout_s"]
        self._max_records = options["max_records_per_partition"]
        self._readers: dict[str, list] = {}  # topic -> [consumer, {partition: next offset}]

    # -- restriction provider ------------------------------------------------------------
    def initial_restriction(self, element: TopicStart) -> Ranges:
        _, starts = element
        extent = self._max_records
        return tuple((p, s, END if extent is None else s + extent) for p, s in starts)

    def create_tracker(self, restriction: Ranges) -> TopicOffsetsTracker:
        return TopicOffsetsTracker(restriction)

    def split(self, element, restriction):
        yield restriction  # one reader per topic: it owns the watermark's minimum

    def restriction_size(self, element, restriction: Ranges) -> int:
        if any(stop == END for _, _, stop in restriction):
            return 1
        return sum(stop - start for _, start, stop in restriction)

    # -- watermark estimator provider ------------------------------------------------------
    def initial_estimator_state(self, element, restriction):
        return {}, None

    def create_watermark_estimator(self, estimator_state) -> TopicWatermark:
        return TopicWatermark(estimator_state, self._delay_ms)

    # -- processing ------------------------------------------------------------------------
    def setup(self):
        self._records_read = Metrics.counter(NAMESPACE, "records_read")
        self._checkpoints = Metrics.counter(NAMESPACE, "checkpoints")

    def teardown(self):
        for consumer, _ in self._readers.values():
            consumer.close()
        self._readers.clear()

    def _reader(self, topic: str, tracker) -> list:
        """[consumer, {partition: next offset}] positioned at the restriction's open ranges."""
        from confluent_kafka import TopicPartition

        wanted = {p: tracker.next_offset(p) for p in tracker.open_partitions()}
        reader = self._readers.get(topic)
        if reader is None:
            reader = [_consumer(self._servers, self._group_id, self._config), None]
            self._readers[topic] = reader
        if reader[1] != wanted:  # assign+seek only when not already there (keeps prefetch)
            reader[0].assign([TopicPartition(topic, p, o) for p, o in wanted.items()])
            reader[1] = dict(wanted)
        return reader

    def _high_offsets(self, consumer, topic: str, partitions) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        # Asked of the broker, not the fetch cache: an empty first poll while the first fetch
        # is in flight must not advance the watermark past unread records.
        return {
            p: consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=self._metadata_timeout_s
            )[1]
            for p in partitions
        }

    def read(self, element: TopicStart, tracker, watermark) -> Iterator[TimestampedValue]:
        topic = element[0]
        open_partitions = tracker.open_partitions()
        watermark.set_partitions(open_partitions)
        if not open_partitions:
            return
        reader = self._reader(topic, tracker)
        consumer, positions = reader
        deadline = time.monotonic() + self._max_bundle_s
        read = 0
        newest: dict[int, int] = {}
        while read < self._max_bundle_records and time.monotonic() < deadline:
            batch = consumer.consume(
                num_messages=min(1000, self._max_bundle_records - read),
                timeout=self._poll_s if read == 0 else 0.05,
            )
            if not batch or not positions:
                break
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.fatal() or not error.retriable():
                        raise RuntimeError(f"Kafka {topic}: {error}")
                    continue
                partition, offset = message.partition(), message.offset()
                if partition not in positions:
                    continue  # a range already exhausted: not ours any more
                if not tracker.try_claim((partition, offset)):
                    # Past this partition's range end (a split, or a bounded run).
                    del positions[partition]
                    reader[1] = None  # re-assign on the next call
                    continue
                ts_type, ts_ms = message.timestamp()
                if ts_type == 0 or ts_ms is None or ts_ms < 0:  # TIMESTAMP_NOT_AVAILABLE
                    ts_ms = _now_ms()
                newest[partition] = max(newest.get(partition, ts_ms), ts_ms)
                positions[partition] = offset + 1
                read += 1
                yield TimestampedValue(message.value() or b"", Timestamp(micros=ts_ms * 1000))
        watermark.records_read(newest)
        self._records_read.inc(read)
        open_partitions = tracker.open_partitions()
        if not open_partitions:
            return  # bounded ranges fully read
        if read >= self._max_bundle_records or time.monotonic() >= deadline:
            self._checkpoints.inc()
            tracker.defer_remainder()  # more is waiting: resume at once
            return
        quiet = [p for p in open_partitions if p not in newest]
        high = self._high_offsets(consumer, topic, quiet)
        caught_up = [p for p in quiet if tracker.next_offset(p) >= high[p]]
        all_idle = not newest and len(caught_up) == len(open_partitions)
        idle_ms = watermark.caught_up(caught_up, all_idle)
        if all_idle and self._stop_when_idle_ms is not None and idle_ms >= self._stop_when_idle_ms:
            # Bounded run: claiming each range's last position ends the restriction.
            tracker.finish()
            return
        self._checkpoints.inc()
        tracker.defer_remainder(Duration(seconds=self._poll_s) if all_idle else None)

    @beam.DoFn.unbounded_per_element()
    def process(
        self, element: TopicStart, tracker=_OWN_RESTRICTION, watermark=_OWN_WATERMARK
    ) -> Iterator[TimestampedValue]:
        yield from self.read(element, _TrackerAccess(tracker), watermark)


class _CommittingReadTopicFn(_ReadTopicFn):
    """Commits the group's offsets once the runner has made a bundle's output durable."""

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: TopicStart,
        # Positional placeholders (the finalizer) must come before the SDF parameters,
        # which Beam passes by keyword.
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=_OWN_RESTRICTION,
        watermark=_OWN_WATERMARK,
    ) -> Iterator[TimestampedValue]:
        access = _TrackerAccess(tracker)
        yield from self.read(element, access, watermark)
        topic = element[0]
        offsets = {p: access.next_offset(p) for p, _, _ in access.ranges()}
        consumer = self._readers[topic][0] if topic in self._readers else None
        # Registered for every bundle: Prism finalizes each bundle of a DoFn that asks for it.
        finalizer.register(lambda: _commit(consumer, topic, offsets))


def _commit(consumer, topic: str, offsets: dict[int, int]) -> None:
    from confluent_kafka import TopicPartition

    if consumer is not None and offsets:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=True
        )


class _TrackerAccess:
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


class ReadKafkaEnvelopes(beam.PTransform):
    """Kafka topic -> raw record bytes, timestamped with the record timestamps (see module).

    ``consumer_config`` adds librdkafka settings (security, timeouts) to the partition
    lister and the reader.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        group_id: str | None = None,
        consumer_config: dict | None = None,
        watermark_delay_ms: int = 60_000,
        poll_interval_s: float = 0.5,
        max_bundle_records: int = 5_000,
        max_bundle_seconds: float = 2.0,
        stop_when_idle_s: float | None = None,
        max_records_per_partition: int | None = None,
        metadata_timeout_s: float = 10.0,
    ):
        super().__init__()
        if not bootstrap_servers or not topic:
            raise ValueError("ReadKafkaEnvelopes needs bootstrap_servers and topic")
        if max_records_per_partition is not None and max_records_per_partition < 1:
            raise ValueError("max_records_per_partition must be positive")
        self._servers = bootstrap_servers
        self._topic = topic
        self._group_id = group_id
        self._config = dict(consumer_config or {})
        self._options = {
            "watermark_delay_ms": watermark_delay_ms,
            "poll_interval_s": poll_interval_s,
            "max_bundle_records": max_bundle_records,
            "max_bundle_seconds": max_bundle_seconds,
            "stop_when_idle_s": stop_when_idle_s,
            "max_records_per_partition": max_records_per_partition,
            "metadata_timeout_s": metadata_timeout_s,
        }

    def expand(self, pbegin):
        read_fn = (_CommittingReadTopicFn if self._group_id else _ReadTopicFn)(
            self._servers, self._group_id, self._config, self._options
        )
        return (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "ListPartitions"
            >> beam.ParDo(
                _ListPartitionsFn(
                    self._servers,
                    self._topic,
                    self._group_id,
                    self._config,
                    self._options["metadata_timeout_s"],
                )
            )
            | "ReadPartitions" >> beam.ParDo(read_fn).with_output_types(bytes)
        )
