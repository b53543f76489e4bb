"""A Python-native Kafka source: a splittable DoFn over a topic's partitions.

Beam's ``ReadFromKafka`` is cross-language: it needs the Java IO expansion service jar and a
runner that runs Java (Flink, Dataflow). Where those are missing -- Prism, a laptop without
the jars -- :class:`ReadKafkaEnvelopes` reads the same topic with confluent-kafka inside the
Python SDK harness.

* The partitions are found at run time (``ListPartitions``, :mod:`.kafka_client`): one element
  per topic whose restriction is an offset range per partition, all partitions in one
  restriction (:mod:`.kafka_tracking` says why, and how the watermark is kept).
* The DoFn assigns one consumer to every partition at its range start (kept between bundles;
  re-assigned only when a resumed restriction does not start where it stopped). It reads at
  most ``max_bundle_records`` / ``max_bundle_seconds``, then checkpoints itself with
  ``defer_remainder``: at once when it stopped for the cap, after ``poll_interval_s`` when
  nothing new came. Runner-initiated checkpoints (split at fraction 0) work too; other
  dynamic splits are refused.
* Element timestamp = the Kafka record timestamp (producers set it to the packet's event
  time: ``qis_beam.transports``); a record without one gets the read time. Records older
  than the watermark (:class:`~.kafka_tracking.TopicWatermark`) are late data downstream.
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

import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from qis_beam.transforms.kafka_client import (
    ListPartitionsFn,
    close_consumer,
    commit,
    coordinator_not_ready,
    make_consumer,
)
from qis_beam.transforms.kafka_tracking import (
    END,
    Ranges,
    TopicOffsetsTracker,
    TopicStart,
    TopicWatermark,
    TrackerAccess,
    topic_watermark,
    wall_ms,
    watermark_after_records,
    watermark_when_idle,
)

__all__ = [
    "NAMESPACE",
    "ReadKafkaEnvelopes",
    # The reader's parts, importable from here as before the split.
    "END",
    "TopicOffsetsTracker",
    "TopicWatermark",
    "coordinator_not_ready",
    "topic_watermark",
    "watermark_after_records",
    "watermark_when_idle",
]

NAMESPACE = "qis_beam.kafka"


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
            close_consumer(consumer)
        self._readers.clear()

    def _reader(self, topic: str, tracker) -> list:
        """[consumer, {partition: next offset}] positioned at the restriction's open ranges."""
        from confluent_kafka import TopicPartition

        wanted = {p: tracker.next_offset(p) for p in tracker.open_partitions()}
        reader = self._readers.get(topic)
        if reader is None:
            reader = [make_consumer(self._servers, self._group_id, self._config), None]
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
                    ts_ms = wall_ms()
                newest[partition] = max(newest.get(partition, ts_ms), ts_ms)
                positions[partition] = offset + 1
                read += 1
                yield TimestampedValue(message.value() or b"", Timestamp(micros=ts_ms * 1000))
        watermark.records_read(newest)
        self._records_read.inc(read)
        open_partitions = tracker.open_partitions()
        if not open_partitions:
            return  # bounded ranges fully read
        # A partition with nothing new holds the topic's watermark back until it is known to
        # be caught up; that is checked even while others are busy, or one empty partition
        # would stall the watermark for as long as traffic on the rest never pauses.
        quiet = [p for p in open_partitions if p not in newest]
        high = self._high_offsets(consumer, topic, quiet) if quiet else {}
        caught_up = [p for p in quiet if tracker.next_offset(p) >= high[p]]
        all_idle = not newest and len(caught_up) == len(open_partitions)
        idle_ms = watermark.caught_up(caught_up, all_idle)
        if read >= self._max_bundle_records or time.monotonic() >= deadline:
            self._checkpoints.inc()
            tracker.defer_remainder()  # more is waiting: resume at once
            return
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
        yield from self.read(element, TrackerAccess(tracker), watermark)


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
        access = TrackerAccess(tracker)
        yield from self.read(element, access, watermark)
        topic = element[0]
        offsets = {p: access.next_offset(p) for p, _, _ in access.ranges()}
        consumer = self._readers[topic][0] if topic in self._readers else None
        # Registered for every bundle: Prism finalizes each bundle of a DoFn that asks for it.
        finalizer.register(lambda: commit(consumer, topic, offsets))


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
                ListPartitionsFn(
                    self._servers,
                    self._topic,
                    self._group_id,
                    self._config,
                    self._options["metadata_timeout_s"],
                )
            )
            | "ReadPartitions" >> beam.ParDo(read_fn).with_output_types(bytes)
        )
