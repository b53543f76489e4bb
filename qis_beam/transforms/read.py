"""Batched reading of TFRecord packet logs (local or any Beam filesystem, e.g. gs://).

``ReadFromTFRecord`` hands records on one at a time, which costs ~8 µs of Beam overhead
per record; reading a shard in chunks and emitting whole ranges of records removes most of it
(beam-facts.md, "Speed"), and the ranges' bytes are handed on with where each record is in
them, for the column-wise decoding of :func:`qis_beam.validation.validate_many`. Each batch is
a *range* of its file (first byte offset and records), which the backfill's second pass
re-reads (:mod:`qis_beam.positions`).

A shard is scanned by one worker (TFRecord has no sync markers to split on): the scan checks
the framing and checksums and emits each range's *descriptor* (where it is, where its records
are), not its bytes. The descriptors are spread over the workers and each range is read where
it is validated, so validation, the costly part, spreads by ranges whatever the number and
sizes of the shards (more workers than files, one large shard), and no shuffle carries the
records.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.pvalue import TaggedOutput

from qis_beam import progress
from qis_beam.positions import FRAMING, iter_runs, open_log, read_range
from qis_beam.tfrecords import CorruptRecordFile
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter
from qis_beam.wire import CORRUPT_TAIL_REASON, corrupt_tail

# (source file, *Run): one range of one file, its bytes and where its records are in them
RecordBatch = tuple[str, int, bytes, np.ndarray, np.ndarray]
# (source file, start offset, end offset, record lengths as <u4 bytes): a range as the scan
# found it, without its bytes (its records are back to back, so lengths give the offsets)
RangeDescriptor = tuple[str, int, int, bytes]
# A batch also ends at this many bytes: bounded memory, and offsets within a range fit the
# uint32 the backfill's shuffles carry them in.
MAX_BATCH_BYTES = 64 << 20


class _ScanShardFn(beam.DoFn):
    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def process(self, shard: tuple[str, int]) -> Iterator[RangeDescriptor | TaggedOutput]:
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
                    yield path, start, start + len(data), lengths.astype("<u4").tobytes()
        except CorruptRecordFile as error:
            records_in.inc()
            detail, tail = corrupt_tail(error, size)
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(CORRUPT_TAIL_REASON, detail, tail, source=path)
            )
        if progress.active():  # the shard is done (a corrupt tail included)
            progress.advance(0, size - reported)


class LogChangedWhileRead(RuntimeError):
    """A range the scan found is no longer all there: the log was changed during the run."""


def read_batch(descriptor: RangeDescriptor) -> RecordBatch:
    """The bytes of a scanned range, with where its records are in them."""
    path, start, end, packed = descriptor
    data = read_range(path, start, end)
    if len(data) != end - start:
        raise LogChangedWhileRead(
            f"{path}: bytes {start}-{end} were scanned, only {len(data)} are left to read"
        )
    lengths = np.frombuffer(packed, "<u4").astype(np.int64)
    at = np.zeros_like(lengths)
    np.cumsum(lengths[:-1] + FRAMING, out=at[1:])
    return path, start, data, at, lengths


class ReadRecordBatches(beam.PTransform):
    """File pattern -> ``{"batches": (source, start offset, bytes, header offsets, record
    lengths), DEAD_LETTERS: ...}``: ranges cut as :func:`qis_beam.positions.iter_runs` cuts
    them, each read on the worker its descriptor was spread to."""

    def __init__(self, file_pattern: str, batch_size: int):
        super().__init__()
        self._file_pattern = file_pattern
        self._batch_size = batch_size

    def expand(self, pbegin):
        scanned = (
            pbegin
            | "MatchShards" >> fileio.MatchFiles(self._file_pattern)
            | "ShardPaths"
            >> beam.Map(lambda m: (m.path, m.size_in_bytes)).with_output_types(tuple[str, int])
            | "SpreadShards" >> beam.Reshuffle()
            | "ScanShards"
            >> beam.ParDo(_ScanShardFn(self._batch_size)).with_outputs(DEAD_LETTERS, main="ranges")
        )
        batches = (
            scanned.ranges
            | "TypedRanges" >> beam.Map(lambda r: r).with_output_types(RangeDescriptor)
            | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRanges" >> beam.Map(read_batch)
        )
        return {"batches": batches, DEAD_LETTERS: scanned[DEAD_LETTERS]}
