"""Shared fixtures: deterministic node keys, packet builders, named test runners."""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from qis_beam.address import semantic_address
from qis_beam.emitter import build_packet, seal
from qis_beam.signing import NodeKey

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR_MS = 3_600_000


def node_key(i: int) -> NodeKey:
    return NodeKey.from_seed(i.to_bytes(32, "big"))


ADDRESS = semantic_address("llm-finetune/v1", {"task": "causal-lm", "params": 1e9})


def make_packet(key: NodeKey | None = None, **fields):
    key = key or node_key(1)
    values = dict(
        key=key,
        address=ADDRESS,
        template_id="llm-finetune/v1",
        approach_id="lr_schedule=cosine",
        outcome_type=1,
        outcome_delta=0.04,
        confidence=0.8,
        sample_count=100,
        event_time_ms=T0_MS,
        emit_time_ms=T0_MS + 1000,
        packet_id=bytes(range(16)),
    )
    values.update(fields)
    return build_packet(**values)


def make_record(key: NodeKey | None = None, **fields) -> bytes:
    key = key or node_key(1)
    return seal(key, make_packet(key, **fields))


def fnapi_options(**extra) -> PipelineOptions:
    """Bounded pipelines in tests always name their runner (a bare DirectRunner tries Prism)."""
    return PipelineOptions([], runner="FnApiRunner", **extra)


@pytest.fixture
def key():
    return node_key(1)
