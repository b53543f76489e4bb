"""The qis-beam options of spec sections 4-7, shared by every command and pipeline.

Frozen dataclasses, built by the CLI and read by the pipeline builders, so no transform
parses command-line text. Each field here declares its default and its help once
(``field(metadata={"help": ...})``); :mod:`qis_beam.options` maps flags onto these fields and
the CLI derives its parser from that table.
"""

from __future__ import annotations

import dataclasses

from qis_beam.synthesis import SynthesisParams
from qis_beam.validation import ValidationPolicy
from qis_beam.wire import DAY_MS, HOUR_MS, MINUTE_MS


def _opt(default, help: str):  # noqa: A002 - the argparse word
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    size_ms: int = _opt(HOUR_MS, "event-time window size")
    period_ms: int | None = _opt(None, "sliding windows: period (divides --window)")
    allowed_lateness_ms: int = _opt(HOUR_MS, "late panes up to this long after a window ends")
    early_firing_count: int = _opt(0, "early pane every N packets of a window (0: none)")
    early_firing_delay_ms: int = _opt(
        0, "streaming runners only: processing-time early panes (0s: none)"
    )

    def __post_init__(self):
        if self.size_ms <= 0:
            raise ValueError("--window must be positive")
        if self.period_ms is not None and (
            self.period_ms <= 0 or self.period_ms > self.size_ms or self.size_ms % self.period_ms
        ):
            raise ValueError("--window-period must be positive and divide --window")

    @property
    def bucket_ms(self) -> int:
        """Granularity at which packets can be pre-aggregated without crossing a window edge."""
        return self.period_ms or self.size_ms


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    emit_every_ms: int = _opt(10 * MINUTE_MS, "all-time snapshots at most this often (event time)")
    state_ttl_ms: int = _opt(7 * DAY_MS, "forget addresses idle for longer")
    dedupe_ttl_ms: int = _opt(DAY_MS, "streaming dedupe horizon (event time)")
    watermark_delay_ms: int = _opt(MINUTE_MS, "the watermark trails the latest emit time by this")


@dataclasses.dataclass(frozen=True)
class Settings:
    validation: ValidationPolicy = ValidationPolicy()
    synthesis: SynthesisParams = SynthesisParams()
    windows: WindowSettings = WindowSettings()
    stream: StreamSettings = StreamSettings()
    dedupe_shards: int = _opt(
        1, "batch dedupe: at least this many packet_id shards (automatic: >= 512, by input size)"
    )
    read_batch_size: int = _opt(50_000, "records per batch handed on by the shard reader")
    hot_key_fanout: int = _opt(0, "batch: CombinePerKey.with_hot_key_fanout (0: off)")


# The streaming commands (replay, run) fire early panes by default: a live reader sees a
# window fill up. A library caller building a graph gets WindowSettings' plain default.
STREAMING_DEFAULTS = Settings(windows=WindowSettings(early_firing_count=100))


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """The live source of ``qis-beam run`` (:mod:`qis_beam.pipelines.run`)."""

    kind: str = _opt("pubsub", "where the packets come from")
    topic: str | None = _opt(None, "Kafka topic, or Pub/Sub projects/P/topics/T")
    subscription: str | None = _opt(None, "Pub/Sub projects/P/subscriptions/S")
    bootstrap_servers: str | None = _opt(None, "Kafka bootstrap servers host:port[,...]")
    kafka_timestamp_policy: str = _opt("CreateTime", "which Kafka record time is event time")
    kafka_expansion_service: str | None = _opt(
        None,
        "host:port of a running Java IO expansion service (default: Beam starts one, "
        "which needs Maven Central)",
    )
    kafka_reader: str | None = _opt(
        None,
        "native: Python reader, any runner (default without --kafka-expansion-service); "
        "xlang: Beam's ReadFromKafka (Java expansion service; Flink/Dataflow)",
    )
    kafka_group_id: str | None = _opt(None, "native: commit offsets to this group, resume there")
    kafka_watermark_delay_ms: int = _opt(
        MINUTE_MS, "native: the watermark trails the newest record timestamp by this much"
    )
    kafka_stop_when_idle_ms: int | None = _opt(
        None, "native: end the job once the topic is drained and idle this long (tests)"
    )
    timestamp_attribute: str | None = _opt(None, "Pub/Sub attribute holding event time (ms)")
    flush_every_ms: int = _opt(
        5 * MINUTE_MS, "period of the rolled output files: one file per output, shard and period"
    )
    output_shards: int = _opt(
        1, "files per output and period, written in parallel (raise it on a busy cluster)"
    )

    @property
    def flush_seconds(self) -> int:
        return max(1, self.flush_every_ms // 1000)
