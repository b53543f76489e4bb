"""The confluent-kafka side of the native Kafka reader: consumers, partitions, commits.

The partitions are found at run time (:class:`ListPartitionsFn`): one element per topic
holding each partition's start offset, the group's committed offset when a ``group_id`` is
given and has one, else the earliest offset. With ``group_id`` the reader commits offsets
(:func:`commit`) when the runner finalizes a bundle, after its output is durable, so a
restarted job goes on where the last one stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import apache_beam as beam

from qis_beam.transforms.kafka_tracking import TopicStart


def make_consumer(bootstrap_servers: str, group_id: str | None, config: dict | None):
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


#: Seconds a consumer's close may take before the bundle goes on without it.
CLOSE_WAIT_S = 10.0


def close_consumer(consumer, wait_s: float = CLOSE_WAIT_S) -> None:
    """Close ``consumer`` without letting a close that never returns hold up the bundle.

    librdkafka's close can retry the group coordinator lookup forever when the broker does not
    answer it (confluentinc/librdkafka#3740), and a fresh broker answers "coordinator load in
    progress" for a while. Had ``ListPartitions`` waited on such a close, its bundle would
    never end and the job would stay RUNNING and read nothing.
    """
    closer = threading.Thread(target=consumer.close, name="kafka-consumer-close", daemon=True)
    closer.start()
    closer.join(wait_s)
    if closer.is_alive():
        logging.getLogger(__name__).warning(
            "Kafka consumer still closing after %.0f s; going on without it", wait_s
        )


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


class ListPartitionsFn(beam.DoFn):
    """Impulse -> (topic, ((partition, start offset), ...))."""

    def __init__(self, bootstrap_servers, topic, group_id, config, metadata_timeout_s):
        self._servers = bootstrap_servers
        self._topic = topic
        self._group_id = group_id
        self._config = config
        self._timeout_s = metadata_timeout_s

    def process(self, _) -> Iterator[TopicStart]:
        from confluent_kafka import TopicPartition

        consumer = make_consumer(self._servers, self._group_id, self._config)
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
            close_consumer(consumer)
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


def commit(consumer, topic: str, offsets: dict[int, int]) -> None:
    from confluent_kafka import TopicPartition

    if consumer is not None and offsets:
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=True
        )
