"""Batch backfill: packet logs (TFRecord, local or gs://) -> synthesis, dead letters.

Two passes over the logs and no funnel (see :mod:`qis_beam.transforms.ingest`): scan each
shard into ranges, spread the ranges over the workers, read and validate each -> dedupe over
many packet_id shards (compact entries, not records) -> re-read each range and fold the kept
packets -> merge partials per (address, window) and per address with one lifted combine. The
number of keys is derived from the input's size.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from qis_beam.dedupe import parts_for, shards_for
from qis_beam.positions import estimated_records, range_records_for
from qis_beam.settings import Settings
from qis_beam.transforms.bigquery import WriteSynthesisToBigQuery
from qis_beam.transforms.deadletters import DEAD_LETTERS
from qis_beam.transforms.ingest import IngestBatches
from qis_beam.transforms.outputs import DEAD_LETTERS_PREFIX, SYNTHESIS_PREFIX, WriteJsonLines
from qis_beam.transforms.read import ReadRecordBatches
from qis_beam.transforms.synthesize import FoldRanges, MergePartials

# Sizing when the input cannot be listed while building (e.g. a Dataflow dry run offline).
UNKNOWN_INPUT_RECORDS = 10_000_000


def input_records(input_pattern: str) -> int:
    """Estimated records of the input, from its files' sizes."""
    try:
        matched = FileSystems.match([input_pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - unlistable here; the pipeline itself will say why
        return UNKNOWN_INPUT_RECORDS
    return estimated_records(sum(m.size_in_bytes for m in matched))


# Runners that run the pipeline in this process (see qis_beam.dedupe.parts_for).
IN_PROCESS_RUNNERS = frozenset(
    {"DirectRunner", "FnApiRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"}
)


def shuffle_parts(options: PipelineOptions, records: int) -> int:
    """Independent dedupe shuffles: several on an in-process runner, which holds a shuffle's
    whole input in memory; one elsewhere. On Flink the parts ran as concurrent tasks feeding
    one SDK worker's data channel, and a 4M-packet backfill with 8 of them deadlocked."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return parts_for(records) if (name or "DirectRunner") in IN_PROCESS_RUNNERS else 1


def build_backfill(
    pipeline: beam.Pipeline,
    input_pattern: str,
    output_dir: str,
    settings: Settings,
    bigquery_table: str | None = None,
):
    records = input_records(input_pattern)
    batch = range_records_for(records, settings.read_batch_size)
    read = pipeline | "ReadPacketLogs" >> ReadRecordBatches(input_pattern, batch)
    ranges, ingest_dead = read["batches"] | "Ingest" >> IngestBatches(
        settings.validation,
        shards_for(records, settings.dedupe_shards),
        shuffle_parts(pipeline.options, records),
    )
    records_out = (
        ranges
        | "FoldPackets" >> FoldRanges(settings.windows)
        | "Synthesize" >> MergePartials(settings.synthesis, settings.hot_key_fanout)
    )
    records_out | "WriteSynthesis" >> WriteJsonLines(output_dir, SYNTHESIS_PREFIX)
    if bigquery_table:
        records_out | "WriteSynthesisToBigQuery" >> WriteSynthesisToBigQuery(bigquery_table, False)
    (
        (read[DEAD_LETTERS], ingest_dead)
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> WriteJsonLines(output_dir, DEAD_LETTERS_PREFIX)
    )
