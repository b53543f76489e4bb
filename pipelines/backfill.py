"""Batch backfill: packet logs (TFRecord, local or gs://) -> synthesis, dead letters."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms import window

from qis_beam.settings import Settings
from qis_beam.transforms.bigquery import WriteSynthesisToBigQuery
from qis_beam.transforms.deadletters import DEAD_LETTERS
from qis_beam.transforms.ingest import IngestBatches
from qis_beam.transforms.outputs import DEAD_LETTERS_PREFIX, SYNTHESIS_PREFIX, WriteJsonLines
from qis_beam.transforms.read import ReadRecordBatches
from qis_beam.transforms.synthesize import FoldPacketLists, SynthesizeAllTime, SynthesizeWindows


def build_backfill(
    pipeline: beam.Pipeline,
    input_pattern: str,
    output_dir: str,
    settings: Settings,
    bigquery_table: str | None = None,
):
    read = pipeline | "ReadPacketLogs" >> ReadRecordBatches(input_pattern, settings.read_batch_size)
    packets, ingest_dead = read.batches | "Ingest" >> IngestBatches(
        settings.validation, settings.dedupe_shards
    )
    partials = packets | "FoldPackets" >> FoldPacketLists(settings.windows)
    windowed = partials | "SynthesizeWindows" >> SynthesizeWindows(
        settings.windows,
        settings.synthesis,
        streaming=False,
        hot_key_fanout=settings.hot_key_fanout,
    )
    all_time = partials | "SynthesizeAllTime" >> SynthesizeAllTime(
        settings.synthesis, hot_key_fanout=settings.hot_key_fanout
    )
    windowed = windowed | "UnwindowRecords" >> beam.WindowInto(window.GlobalWindows())
    records = (windowed, all_time) | "AllSynthesis" >> beam.Flatten()
    records | "WriteSynthesis" >> WriteJsonLines(output_dir, SYNTHESIS_PREFIX)
    if bigquery_table:
        records | "WriteSynthesisToBigQuery" >> WriteSynthesisToBigQuery(bigquery_table, False)
    (
        (read[DEAD_LETTERS], ingest_dead)
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteJsonLines(output_dir, DEAD_LETTERS_PREFIX)
    )
