"""Ingestion of spec section 4 in batch: validate, dead-letter, deduplicate (batch rule).

No funnel and no raw records in the shuffle:

1. ``Validate`` runs per record batch (one range of a file, as read), column-wise
   (:func:`qis_beam.validation.validate_many`: numpy over the batch for records of the usual
   shape, :func:`~qis_beam.validation.validate` for the others; signatures verified on a
   thread pool). Each valid copy becomes a 24-byte entry: packet_id prefix, a keyed 64-bit digest of
   its payload and its source position. Entries go to ``shards`` dedupe keys by a hash of the
   packet_id (many keys, sized from the input: see :func:`qis_beam.dedupe.shards_for`), in
   slices buffered across the bundle (at most 2**18 entries, 6 MiB, in all; up to 2**21 with
   more than 1024 shards), so a shuffled element is at most a batch's worth. Each range
   also emits its descriptor (where it is and which of its records were invalid), and each
   invalid record a compact dead letter (reason, detail and position, not the record), into
   the same shuffle: Flink's batch runner writes a stage's whole output once for each of its
   outputs, so the validation stage has one.
2. ``Dedupe`` gets all copies of its packet_ids. Prefixes seen once are kept without a look;
   repeated ones with one digest keep the copy at the smallest position (the others are
   duplicates); repeated ones with different digests have their raw records read back from
   their positions and the exact rule applied per real packet_id (smallest payload kept,
   other payloads are ``conflicting_duplicate`` dead letters carrying the raw record). It
   emits, per range, the offsets of the copies not to fold, passes the descriptors on, and
   completes validation's dead letters with their records, read back from their positions.
   The shards are spread over independent shuffles of ~1M entries each
   (:func:`qis_beam.dedupe.parts_for`), so a local runner never holds one shuffle of the
   whole input.
3. ``GatherRanges`` brings each range's descriptor and drop lists together; the fold
   (:class:`qis_beam.transforms.synthesize.FoldRanges`) re-reads the range and folds the rest.

The verdict depends only on the set of copies, never on arrival order, bundling or sharding.
Memory: the shuffles hold 24 bytes per valid copy plus a few per range and per invalid record,
not the records.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from qis_beam.dedupe import (
    ENTRY,
    Position,
    decide,
    payload_digests,
    repeated_runs,
    shard_of,
)
from qis_beam.positions import HEADER_BYTES, fetch_records
from qis_beam.signing import ThreadedVerifier
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter, distribution
from qis_beam.transforms.read import RecordBatch
from qis_beam.validation import DUPLICATE_REASON, ValidationPolicy, validate_many
from qis_beam.wire import decode_packet, payload_of

# Dedupe shuffle slice: (files, RANGE array bytes, ENTRY array bytes); an entry's "range"
# indexes the ranges, a range's "path" the files. ~12 bytes per range, 24 per copy.
Slice = tuple[list[str], bytes, bytes]
# What the dedupe shuffle carries, keyed by shard: (SLICE, Slice), (DESCRIPTOR, (range key,
# RangePart)) or (DEAD_LETTER, Rejection). One output for the validation stage, see above.
Shuffled = tuple[int, Any]
# An invalid record's dead letter without its record: (reason, detail, packet_id, file, offset).
Rejection = tuple[str, str, bytes | None, str, int]
SLICE, DESCRIPTOR, DEAD_LETTER = 0, 1, 2
RANGE = np.dtype([("path", "<u4"), ("start", "<u8")])
# Fold shuffle element, keyed by range key: a descriptor (end offset, valid records, packed
# uint32 offsets of invalid records relative to the start) or a drop list (DROPS, 0, packed
# relative offsets of copies the dedupe did not keep).
RangePart = tuple[int, int, bytes]
DROPS = -1
# Entries are buffered across the batches of a bundle and sent, one slice per shard, at the
# end of the bundle or when enough are buffered for slices of SLICE_ENTRIES (at least 6 MiB,
# at most 48 MiB): slices stay large even with many shards and small batches.
BUNDLE_ENTRIES = 1 << 18
MAX_BUNDLE_ENTRIES = 1 << 21
SLICE_ENTRIES = 256


def flush_entries(shards: int) -> int:
    """Entries a validation worker buffers before cutting them into slices."""
    return max(BUNDLE_ENTRIES, min(MAX_BUNDLE_ENTRIES, shards * SLICE_ENTRIES))


def range_key(path: str, start: int) -> str:
    return f"{start}@{path}"


def parse_range_key(key: str) -> Position:
    start, path = key.split("@", 1)
    return path, int(start)


def _packet_id(payload: bytes) -> bytes:
    return decode_packet(payload).packet_id


def _relative(offsets: Iterable[int]) -> bytes:
    return np.fromiter(offsets, dtype="<u4").tobytes()


def spread_key(token: bytes, shards: int) -> str:
    """The dedupe shard that carries a range's descriptor or a dead letter (CRC-32 of its
    range key or position; any shard will do, spread so none gathers many)."""
    return str(zlib.crc32(token) % shards)


class _ValidateBatchFn(beam.DoFn):
    def __init__(self, policy: ValidationPolicy, shards: int):
        self._policy = policy
        self._shards = shards
        self._flush_at = flush_entries(shards)
        # One key per pipeline: digests cannot be made to collide by whoever writes packets.
        self._digest_key = os.urandom(16)

    def setup(self) -> None:
        self._verifier = ThreadedVerifier()

    def teardown(self) -> None:
        self._verifier.close()

    def start_bundle(self) -> None:
        self._ranges: list[tuple[str, int]] = []  # (file, start) of the buffered entries
        self._pending: list[np.ndarray] = []
        self._buffered = 0

    def process(self, batch: RecordBatch) -> Iterator:
        source, start, data, rel, lengths = batch  # rel: each header's offset in the range
        policy = self._policy
        at = rel + HEADER_BYTES
        verdicts = validate_many(data, at, at + lengths, policy, policy.clock_ms(), self._verifier)
        key = range_key(source, start)
        for i, verdict in verdicts.rejections:
            offset = start + int(rel[i])
            rejection = (verdict.reason, verdict.detail, verdict.packet_id, source, offset)
            where = range_key(source, offset).encode()  # a record's position, as a key
            yield spread_key(where, self._shards), (DEAD_LETTER, rejection)
        invalid = rel[[i for i, _ in verdicts.rejections]]
        valid = len(verdicts.payloads)
        descriptor = (key, (start + len(data), valid, _relative(invalid)))
        yield spread_key(key.encode(), self._shards), (DESCRIPTOR, descriptor)
        if not valid:
            return
        entries = np.empty(valid, dtype=ENTRY)
        entries["id"] = verdicts.packet_ids[:, :8].copy().view(">u8").reshape(-1)
        entries["digest"] = np.frombuffer(
            payload_digests(verdicts.payloads, self._digest_key), "<u8"
        )
        entries["rel"] = rel[verdicts.valid]
        entries["range"] = len(self._ranges)
        self._ranges.append((source, start))
        self._pending.append(entries)
        self._buffered += len(entries)
        if self._buffered >= self._flush_at:
            yield from self._slices()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for element in self._slices():
            yield WindowedValue(element, MIN_TIMESTAMP, (GlobalWindow(),))

    def _slices(self) -> Iterator[tuple[str, Shuffled]]:
        """The buffered entries, one slice per shard, each with its own table of ranges.

        Vectorised over the flush: entries sorted by (shard, range) once, each slice's range
        and file indexes renumbered in the same pass, so a slice costs a few byte copies
        (numpy calls per shard cost 25-36 us a slice: 8192 shards, 10-14 s of a 12M job)."""
        if not self._pending:
            return
        entries = np.concatenate(self._pending)
        names: dict[str, int] = {}
        range_path = np.array([names.setdefault(p, len(names)) for p, _ in self._ranges])
        range_start = np.array([start for _, start in self._ranges], dtype=np.uint64)
        names_list = list(names)
        n_ranges, n_paths = len(self._ranges), len(names_list)
        self._pending, self._ranges, self._buffered = [], [], 0

        # Entries grouped by (shard, range); each distinct pair is one row of a slice's table.
        pair = shard_of(entries, self._shards) * n_ranges + entries["range"]
        order = np.argsort(pair, kind="stable")
        pair, entries = pair[order], entries[order]
        new_pair = np.r_[True, pair[1:] != pair[:-1]]
        pairs = pair[new_pair]
        pair_shard, pair_range = pairs // n_ranges, pairs % n_ranges
        new_shard = np.r_[True, pair_shard[1:] != pair_shard[:-1]]
        shard_first_pair = np.flatnonzero(new_shard)  # first pair of each slice
        slice_of_pair = np.cumsum(new_shard) - 1
        # An entry's range: its pair's row in its slice's table.
        pair_of_entry = np.cumsum(new_pair) - 1
        entries["range"] = pair_of_entry - shard_first_pair[slice_of_pair[pair_of_entry]]
        # A row's file: the index among its slice's files (sorted by file number).
        file_key = pair_shard * n_paths + range_path[pair_range]
        slice_files = np.unique(file_key)
        files_first = np.searchsorted(slice_files, pair_shard[shard_first_pair] * n_paths)
        table = np.empty(len(pairs), dtype=RANGE)
        table["path"] = np.searchsorted(slice_files, file_key) - files_first[slice_of_pair]
        table["start"] = range_start[pair_range]

        # Each slice is cut from the flush's bytes: one copy, no numpy call per slice.
        entry_bytes, table_bytes = entries.tobytes(), table.tobytes()
        entry_cuts = (np.flatnonzero(new_pair)[shard_first_pair] * ENTRY.itemsize).tolist()
        row_cuts = (shard_first_pair * RANGE.itemsize).tolist()
        file_cuts = files_first.tolist()
        entry_cuts.append(len(entry_bytes))
        row_cuts.append(len(table_bytes))
        file_cuts.append(len(slice_files))
        file_names = [names_list[k % n_paths] for k in slice_files.tolist()]
        for i, shard in enumerate(pair_shard[shard_first_pair].tolist()):
            files = file_names[file_cuts[i] : file_cuts[i + 1]]
            rows = table_bytes[row_cuts[i] : row_cuts[i + 1]]
            yield str(shard), (SLICE, (files, rows, entry_bytes[entry_cuts[i] : entry_cuts[i + 1]]))


class _DedupeShardFn(beam.DoFn):
    """All copies of one shard's packet_ids -> per range, the offsets not to fold; the
    descriptors and dead letters the shard carried, passed on."""

    def process(self, element: tuple[str, Iterable[Shuffled]]) -> Iterator:
        _, carried = element
        slices: list[Slice] = []
        rejections: list[Rejection] = []
        for kind, value in carried:
            if kind == SLICE:
                slices.append(value)
            elif kind == DESCRIPTOR:
                yield value
            else:
                rejections.append(value)
        if rejections:
            records = fetch_records([(path, offset) for *_, path, offset in rejections])
            for reason, detail, packet_id, path, offset in rejections:
                record = records[(path, offset)]
                yield TaggedOutput(
                    DEAD_LETTERS, dead_letter(reason, detail, record, packet_id, path)
                )
        if slices:
            yield from self._dedupe(slices)

    def _dedupe(self, slices: list[Slice]) -> Iterator:
        paths: list[str] = []
        range_paths, range_starts, arrays = [], [], []
        n_ranges = 0
        for slice_paths, table, data in slices:
            entries = np.frombuffer(data, dtype=ENTRY).copy()
            entries["range"] += n_ranges
            table = np.frombuffer(table, dtype=RANGE)
            n_ranges += len(table)
            range_paths.append(table["path"].astype(np.int64) + len(paths))
            range_starts.append(table["start"])
            paths.extend(slice_paths)
            arrays.append(entries)
        entries = np.concatenate(arrays)
        range_path = np.concatenate(range_paths)
        range_start = np.concatenate(range_starts)
        distribution("dedupe_key_packets").update(len(entries))
        drops: dict[str, list[int]] = {}
        duplicates = conflicts = 0
        for run in repeated_runs(entries):
            # position -> (range key, offset relative to the range's start)
            where: dict[Position, tuple[str, int]] = {}
            copies = []
            for i in run.tolist():
                r, rel = entries["range"][i], int(entries["rel"][i])
                path, start = paths[range_path[r]], int(range_start[r])
                key = range_key(path, start)
                where[(path, start + rel)] = (key, rel)
                copies.append((int(entries["digest"][i]), (path, start + rel)))
            verdict = decide(copies, fetch_records, payload_of, _packet_id)
            not_kept = verdict.duplicates + [at for at, _, _ in verdict.conflicts]
            for at in not_kept:
                key, rel = where[at]
                drops.setdefault(key, []).append(rel)
            for (path, _), record, pid in verdict.conflicts:
                detail = "same packet_id as a packet with a smaller payload, which is kept"
                yield TaggedOutput(
                    DEAD_LETTERS, dead_letter(DUPLICATE_REASON, detail, record, pid, path)
                )
            duplicates += len(verdict.duplicates)
            conflicts += len(verdict.conflicts)
        counter("duplicates").inc(duplicates)
        counter("valid").inc(len(entries) - duplicates - conflicts)
        for key, offsets in drops.items():
            yield key, (DROPS, 0, _relative(offsets))


class _ShuffleAndDedupe(beam.PTransform):
    """Shuffled elements -> drops and descriptors (main) and dead letters, over ``parts``
    independent shuffles of the shards (see :func:`qis_beam.dedupe.parts_for`)."""

    def __init__(self, parts: int):
        super().__init__()
        self._parts = parts

    def expand(self, slices):
        parts = self._parts
        split = (
            [slices]
            if parts == 1
            else slices | "Split" >> beam.Partition(lambda kv, n: int(kv[0]) % n, parts)
        )
        deduped = [
            part
            # typed str keys: a deterministic key coder on every runner
            | f"Typed{i}" >> beam.Map(lambda kv: kv).with_output_types(tuple[str, Shuffled])
            | f"Part{i}" >> beam.GroupByKey()
            | f"Dedupe{i}" >> beam.ParDo(_DedupeShardFn()).with_outputs(DEAD_LETTERS, main="drops")
            for i, part in enumerate(split)
        ]
        return (
            [d.drops for d in deduped] | "Drops" >> beam.Flatten(),
            [d[DEAD_LETTERS] for d in deduped] | "DeadLetters" >> beam.Flatten(),
        )


class IngestBatches(beam.PTransform):
    """Record batches -> (range key, [RangePart]) groups to fold; dead letters."""

    def __init__(self, policy: ValidationPolicy, dedupe_shards: int, shuffle_parts: int = 1):
        super().__init__()
        self._policy = policy
        self._shards = dedupe_shards
        self._parts = shuffle_parts

    def expand(self, batches):
        shuffled = batches | "Validate" >> beam.ParDo(_ValidateBatchFn(self._policy, self._shards))
        parts, dead = shuffled | "ShuffleByPacketId" >> _ShuffleAndDedupe(self._parts)
        ranges = (
            parts
            | "TypedRangeKey" >> beam.Map(lambda kv: kv).with_output_types(tuple[str, RangePart])
            | "GatherRanges" >> beam.GroupByKey()
        )
        return ranges, dead
