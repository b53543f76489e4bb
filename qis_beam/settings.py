"""The qis-beam options of spec sections 4-7, shared by every command and pipeline.

One frozen dataclass, built by the CLI and read by the pipeline builders, so no transform
parses command-line text and every option has one default.
"""

from __future__ import annotations

import dataclasses

from qis_beam.synthesis import SynthesisParams
from qis_beam.validation import ValidationPolicy

HOUR_MS = 3_600_000


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    size_ms: int = HOUR_MS
    period_ms: int | None = None  # sliding windows when set (must divide size_ms)
    allowed_lateness_ms: int = HOUR_MS
    early_firing_count: int = 0  # streaming: early pane every N packets (0 = none)
    early_firing_delay_ms: int = 0  # streaming only: processing-time early panes (0 = none)

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
    emit_every_ms: int = 10 * 60_000  # all-time snapshots at most this often (event time)
    state_ttl_ms: int = 7 * 24 * HOUR_MS  # forget addresses idle for longer
    dedupe_ttl_ms: int = 24 * HOUR_MS
    watermark_delay_ms: int = 60_000  # replay: watermark trails the latest emit time by this


@dataclasses.dataclass(frozen=True)
class Settings:
    validation: ValidationPolicy = ValidationPolicy()
    synthesis: SynthesisParams = SynthesisParams()
    windows: WindowSettings = WindowSettings()
    stream: StreamSettings = StreamSettings()
    dedupe_shards: int = 1  # batch dedupe: parallel groups keyed by packet_id (raise on clusters)
    read_batch_size: int = 50_000  # records per batch handed on by the shard reader
    hot_key_fanout: int = 0  # batch: CombinePerKey.with_hot_key_fanout (0 = off)
