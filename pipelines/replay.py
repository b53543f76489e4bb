"""Replay: packet logs played as an unbounded stream through TestStream (BundleBasedDirectRunner;
not Prism, see ``qis_beam.replay.check_replay_runner``)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from qis_beam import progress
from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.replay import ReplayPlan
from qis_beam.settings import Settings
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain


def replay_source(plan: ReplayPlan, drain_until_ms: int) -> TestStream:
    """The plan as a TestStream; ends past every pending timer, then at +infinity."""
    stream = TestStream().with_output_types(tuple[bytes, str])
    for step in plan.steps:
        stream.add_elements(
            [
                TimestampedValue((record, source), Timestamp(micros=ts * 1000))
                for record, source, ts in step.elements
            ]
        )
        if step.watermark_ms is not None:
            stream.advance_watermark_to(Timestamp(micros=step.watermark_ms * 1000))
    # BundleBasedDirectRunner drops timer output after a large watermark jump
    # (beam-facts.md): stop past the last timer before going to infinity.
    stream.advance_watermark_to(Timestamp(micros=drain_until_ms * 1000))
    stream.advance_watermark_to_infinity()
    return stream


def build_replay(
    pipeline: beam.Pipeline,
    plan: ReplayPlan,
    drain_until_ms: int,
    output_dir: str,
    settings: Settings,
):
    records = pipeline | "ReplayPacketLog" >> replay_source(plan, drain_until_ms)
    if progress.active():  # a terminal watches this run, in this process
        records = records | "ReplayProgress" >> beam.Map(_counted).with_output_types(
            tuple[bytes, str]
        )
    build_streaming_graph(records, output_dir, settings, write=WriteJsonLinesOnDrain, tally=True)


def _counted(element: tuple[bytes, str]) -> tuple[bytes, str]:
    progress.advance(1)
    return element
