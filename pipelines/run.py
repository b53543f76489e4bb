"""The production streaming job: Kafka (Flink) or Pub/Sub (Dataflow) -> the streaming graph.

Both sources deliver raw ``Envelope`` bytes; event time is taken from the packet by the
ingest step. For a source watermark that follows event time, have producers set it at the
source: Kafka record timestamps = event time with ``--kafka-timestamp-policy CreateTime``,
or a Pub/Sub attribute named by ``--timestamp-attribute``.

Kafka has two readers (``--kafka-reader``): ``native`` (qis_beam/transforms/kafka_read.py, a
Python splittable DoFn over confluent-kafka; runs on Prism and any portable runner, no
jars) and ``xlang`` (Beam's cross-language ReadFromKafka, for clusters with the Java IO
expansion service).
"""

from __future__ import annotations

import apache_beam as beam

from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.settings import Settings, SourceSettings
from qis_beam.transforms.outputs import WriteJsonLinesContinuously


def kafka_reader(source: SourceSettings) -> str:
    if source.kafka_reader is not None:
        return source.kafka_reader
    return "xlang" if source.kafka_expansion_service else "native"


def read_envelopes(pipeline: beam.Pipeline, source: SourceSettings):
    """The live source as (record, source name) pairs."""
    if source.kind == "pubsub":
        name = source.subscription or source.topic
        raw = pipeline | "ReadPubSub" >> beam.io.ReadFromPubSub(
            topic=None if source.subscription else source.topic,
            subscription=source.subscription,
            timestamp_attribute=source.timestamp_attribute,
        )
    elif source.kind == "kafka" and kafka_reader(source) == "native":
        from qis_beam.transforms.kafka_read import ReadKafkaEnvelopes

        name = source.topic
        raw = pipeline | "ReadKafkaNative" >> ReadKafkaEnvelopes(
            source.bootstrap_servers,
            source.topic,
            group_id=source.kafka_group_id,
            watermark_delay_ms=source.kafka_watermark_delay_ms,
            stop_when_idle_s=(
                None
                if source.kafka_stop_when_idle_ms is None
                else source.kafka_stop_when_idle_ms / 1000
            ),
        )
    elif source.kind == "kafka":
        from apache_beam.io.kafka import ReadFromKafka  # cross-language: Java expansion service

        name = source.topic
        expansion = (
            {"expansion_service": source.kafka_expansion_service}
            if source.kafka_expansion_service
            else {}
        )
        raw = (
            pipeline
            | "ReadKafka"
            >> ReadFromKafka(
                consumer_config={"bootstrap.servers": source.bootstrap_servers},
                topics=[source.topic],
                timestamp_policy=source.kafka_timestamp_policy,
                **expansion,
            )
            | "KafkaValues" >> beam.Map(lambda kv: kv[1])
        )
    else:
        raise ValueError(f"unknown source {source.kind!r}")
    return raw | "WithSourceName" >> beam.Map(
        lambda record: (bytes(record), name)
    ).with_output_types(tuple[bytes, str])


def build_run(
    pipeline: beam.Pipeline,
    source: SourceSettings,
    output_dir: str,
    settings: Settings,
    bigquery_table: str | None = None,
    store_url: str | None = None,
):
    records = read_envelopes(pipeline, source)

    def write(directory: str, prefix: str):
        return WriteJsonLinesContinuously(
            directory, prefix, source.flush_seconds, source.output_shards
        )

    build_streaming_graph(
        records,
        output_dir,
        settings,
        write=write,
        bigquery_table=bigquery_table,
        store_url=store_url,
    )
