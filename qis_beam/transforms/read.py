"""Batched reading of TFRecord packet logs (local or any Beam filesystem, e.g. gs://).

``ReadFromTFRecord`` hands records on one at a time, which costs ~8 µs of Beam overhead
per record; reading a shard in chunks and emitting whole ranges of records removes most of it
(beam-facts.md, "Speed"), and the ranges' bytes are handed on as read, with where each record
is in them, for the column-wise decoding of :func:`qis_beam.validation.validate_many`. Each
batch is a *range* of its file (first byte offset and records), which the backfill's second
pass re-reads (:mod:`qis_beam.positions`). A shard is read by one worker (TFRecord has no
sync markers to split on): write logs in many shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.pvalue import TaggedOutput

from qis_beam import progress
from qis_beam.positions import iter_runs, open_log
from qis_beam.tfrecords import CorruptRecordFile
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter
from qis_beam.wire import CORRUPT_TAIL_REASON, corrupt_tail

# (source file, *Run): one range of one file, its bytes and where its records are in them
RecordBatch = tuple[str, int, bytes, np.ndarray, np.ndarray]
# A batch also ends at this many bytes: bounded memory, and offsets within a range fit the
# uint32 the backfill's shuffles carry them in.
MAX_BATCH_BYTES = 64 << 20


class _ReadShardBatchesFn(beam.DoFn):
    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def process(self, shard: tuple[str, int]) -> Iterator[RecordBatch | TaggedOutput]:
        path, size = shard
        records_in = counter("records_in")
        reported = 0  # bytes shown by a progress bar in this process
        try:
            with open_log(path) as handle:
                for start, data, offsets, lengths in iter_runs(
                    handle, self._batch_size, MAX_BATCH_BYTES
                ):
                    records_in.inc(len(offsets))
                    if progress.active():
                        progress.advance(len(offsets), len(data))
                        reported += len(data)
                    yield path, start, data, offsets, lengths
        except CorruptRecordFile as error:
            records_in.inc()
            detail, tail = corrupt_tail(error, size)
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(CORRUPT_TAIL_REASON, detail, tail, source=path)
            )
        if progress.active():  # the shard is done (a corrupt tail included)
            progress.advance(0, size - reported)


class ReadRecordBatches(beam.PTransform):
    """File pattern -> (source, start offset, bytes, header offsets, record lengths) batches
    (see :func:`qis_beam.positions.iter_runs`), plus dead letters."""

    def __init__(self, file_pattern: str, batch_size: int):
        super().__init__()
        self._file_pattern = file_pattern
        self._batch_size = batch_size

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchShards" >> fileio.MatchFiles(self._file_pattern)
            | "ShardPaths"
            >> beam.Map(lambda m: (m.path, m.size_in_bytes)).with_output_types(tuple[str, int])
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards"
            >> beam.ParDo(_ReadShardBatchesFn(self._batch_size)).with_outputs(
                DEAD_LETTERS, main="batches"
            )
        )
