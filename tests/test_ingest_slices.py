"""The dedupe shuffle's slices (qis_beam.transforms.ingest): each buffered entry reaches its
own shard exactly once, with its own file and range start, and slices stay large."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.dedupe import ENTRY, shard_of, shards_for
from qis_beam.transforms.ingest import (
    RANGE,
    SLICE,
    SLICE_ENTRIES,
    _ValidateBatchFn,
    flush_entries,
)

# A flush: distinct ranges as (file number, start, entry count).
ranges_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 10**12), st.integers(1, 60)),
    min_size=1,
    max_size=20,
    unique_by=lambda r: r[:2],
)


def _fields(entry) -> tuple[int, int, int]:
    """What a slice must carry unchanged: packet_id prefix, payload digest, offset."""
    return int(entry["id"]), int(entry["digest"]), int(entry["rel"])


def _buffered(shards: int, ranges: list[tuple[int, int, int]], seed: int):
    """A validation DoFn holding these ranges' entries, and what each entry must become."""
    rng = np.random.default_rng(seed)
    fn = _ValidateBatchFn.__new__(_ValidateBatchFn)
    fn._shards = shards
    fn.start_bundle()
    expected = []
    for file, start, count in ranges:
        entries = np.zeros(count, dtype=ENTRY)
        entries["id"] = rng.integers(0, 2**63, count, dtype=np.uint64)
        entries["digest"] = rng.integers(0, 2**63, count, dtype=np.uint64)
        entries["rel"] = rng.integers(0, 2**31, count)
        entries["range"] = len(fn._ranges)
        fn._ranges.append((f"packets-{file}.tfrecord", start))
        fn._pending.append(entries)
        for entry, shard in zip(entries, shard_of(entries, shards).tolist(), strict=True):
            where = (f"packets-{file}.tfrecord", start)
            expected.append((str(shard), where, *_fields(entry)))
    return fn, expected


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([1, 2, 8, 64, 1024]), ranges_strategy, st.integers(0, 2**32))
def test_every_entry_reaches_its_shard_once_with_its_range(shards, ranges, seed):
    fn, expected = _buffered(shards, ranges, seed)
    got = []
    keys = []
    for key, (kind, (files, table, data)) in fn._slices():
        assert kind == SLICE
        keys.append(key)
        rows = np.frombuffer(table, dtype=RANGE)
        entries = np.frombuffer(data, dtype=ENTRY)
        assert len(set(files)) == len(files)
        assert len(set(rows.tolist())) == len(rows)  # distinct (file, start) rows
        assert sorted(set(entries["range"].tolist())) == list(range(len(rows)))  # no idle row
        assert sorted(set(rows["path"].tolist())) == list(range(len(files)))  # no idle file
        for entry in entries:
            row = rows[entry["range"]]
            where = (files[row["path"]], int(row["start"]))
            got.append((key, where, *_fields(entry)))
    assert len(keys) == len(set(keys))  # one slice per shard
    assert sorted(got) == sorted(expected)
    assert fn._pending == [] and fn._ranges == []


def test_slices_stay_large_as_inputs_grow():
    """A flush is cut into one slice per shard: up to 100M records, slices average at least
    SLICE_ENTRIES entries, so the shuffle's element count grows with the input, not its square."""
    for records in (10**6, 4 * 10**6, 12 * 10**6, 10**8):
        shards = shards_for(records)
        assert flush_entries(shards) / shards >= SLICE_ENTRIES, records
