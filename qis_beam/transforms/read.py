"""Batched reading of TFRecord packet logs (local or any Beam filesystem, e.g. gs://).

``ReadFromTFRecord`` hands records on one at a time, which costs ~8 µs of Beam overhead
per record; reading a whole shard and emitting lists of records removes most of it
(beam-facts.md, "Speed"). Each shard is read by one worker: write logs in many shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.pvalue import TaggedOutput

from qis_beam.tfrecords import CorruptRecordFile, iter_records, read_file
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter

# A corrupt shard tail is one dead letter; its raw bytes are cut to keep the record small.
MAX_DEAD_LETTER_RECORD_BYTES = 4096

RecordBatch = tuple[str, list[bytes]]  # (source file, records)


class _ReadShardBatchesFn(beam.DoFn):
    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def process(self, path: str) -> Iterator[RecordBatch | TaggedOutput]:
        records_in = counter("records_in")
        batch: list[bytes] = []
        try:
            for record in iter_records(read_file(path)):
                batch.append(record)
                if len(batch) >= self._batch_size:
                    records_in.inc(len(batch))
                    yield path, batch
                    batch = []
        except CorruptRecordFile as error:
            records_in.inc()
            rest = error.rest[:MAX_DEAD_LETTER_RECORD_BYTES]
            detail = f"{error}; the rest of the shard ({len(error.rest)} bytes) cannot be framed"
            yield TaggedOutput(DEAD_LETTERS, dead_letter("undecodable", detail, rest, source=path))
        if batch:
            records_in.inc(len(batch))
            yield path, batch


class ReadRecordBatches(beam.PTransform):
    """File pattern -> (source, [record bytes]) batches, plus a dead-letter output."""

    def __init__(self, file_pattern: str, batch_size: int):
        super().__init__()
        self._file_pattern = file_pattern
        self._batch_size = batch_size

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchShards" >> fileio.MatchFiles(self._file_pattern)
            | "ShardPaths" >> beam.Map(lambda metadata: metadata.path).with_output_types(str)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards"
            >> beam.ParDo(_ReadShardBatchesFn(self._batch_size)).with_outputs(
                DEAD_LETTERS, main="batches"
            )
        )
