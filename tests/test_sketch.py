"""DistinctSketch (qis_beam/synthesis/sketch.py): bottom-k distinct counting. No Beam runner is
involved: these are plain-Python properties (hypothesis) of the sketch on its own."""

from __future__ import annotations

import contextlib
import gc
import math
import random
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.synthesis import sketch
from qis_beam.synthesis.sketch import DistinctSketch

U64 = st.integers(0, 2**64 - 1)
# Few distinct values too, so duplicates (within and across sketches) are common.
HASH = st.one_of(U64, st.integers(0, 40))
HASHES = st.lists(HASH, max_size=300)
KS = st.sampled_from([2, 3, 8, 64, 100])
# (tuple_max, set_merge_max): force the small (tuple / set) or large (array / numpy) internals.
THRESHOLDS = [(0, 0), (64, 128), (10**9, 10**9), (2, 10**9), (10**9, 0)]


@contextlib.contextmanager
def representation(tuple_max: int, set_merge_max: int):
    saved = sketch._TUPLE_MAX, sketch._SET_MERGE_MAX
    sketch._TUPLE_MAX, sketch._SET_MERGE_MAX = tuple_max, set_merge_max
    try:
        yield
    finally:
        sketch._TUPLE_MAX, sketch._SET_MERGE_MAX = saved


def bottom_k(hashes, k: int) -> list[int]:
    return sorted(set(hashes))[:k]


def build(hashes, k: int, how: int) -> DistinctSketch:
    """The sketch of ``hashes`` built one of the ways the accumulator builds them."""
    if how == 0:  # one add per packet
        s = DistinctSketch(k)
        for h in hashes:
            s.add(h)
        return s
    if how == 1:  # decoded from any order, with duplicates
        return DistinctSketch.from_hashes(list(hashes), k)
    if how == 2:  # a numpy batch, split into runs
        run = np.unique(np.array(hashes, dtype=np.uint64))
        (s,) = DistinctSketch.split(run, np.array([0, len(run)]), k)
        return s
    # merged from two halves
    s = build(hashes[::2], k, 0)
    return s.merge(build(hashes[1::2], k, 1))


HOW = st.integers(0, 3)


@settings(max_examples=200, deadline=None)
@given(hashes=HASHES, k=KS, how=HOW, thresholds=st.sampled_from(THRESHOLDS))
def test_keeps_the_k_smallest_and_counts_exactly_below_k(hashes, k, how, thresholds):
    with representation(*thresholds):
        s = build(hashes, k, how)
        assert s.smallest() == bottom_k(hashes, k)
        distinct = len(set(hashes))
        if distinct < k:
            assert s.count() == distinct
        else:
            kth = bottom_k(hashes, k)[-1]
            assert s.count() == round((k - 1) * 2**64 / kth)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.tuples(HASHES, HOW), min_size=2, max_size=4),
    k=KS,
    thresholds=st.sampled_from(THRESHOLDS),
    seed=st.integers(0, 2**32),
)
def test_merge_is_the_bottom_k_of_the_union_in_any_order(parts, k, thresholds, seed):
    """Commutative and associative: any merge tree of the parts gives the union's bottom-k."""
    everything = [h for hashes, _ in parts for h in hashes]
    with representation(*thresholds):
        sketches = [build(hashes, k, how) for hashes, how in parts]
        before = [s.smallest() for s in sketches]
        rng = random.Random(seed)
        pool = [s.copy() for s in sketches]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            merged = pool[i].merge(pool[j])
            pool = [p for n, p in enumerate(pool) if n not in (i, j)] + [merged]
        (tree,) = pool
        left = sketches[0].copy()
        for s in sketches[1:]:
            left.merge(s)
        right = sketches[-1].copy()
        for s in reversed(sketches[:-1]):
            right.merge(s)
        for s in (tree, left, right):
            assert s.smallest() == bottom_k(everything, k)
            assert s.count() == left.count()
        assert [s.smallest() for s in sketches] == before  # merge reads, never changes, other


@settings(max_examples=150, deadline=None)
@given(hashes=HASHES, more=HASHES, k=KS, how=HOW, thresholds=st.sampled_from(THRESHOLDS))
def test_serialisation_round_trip(hashes, more, k, how, thresholds):
    """smallest() is the stored form: read back, it counts and merges like the original."""
    with representation(*thresholds):
        s = build(hashes, k, how)
        back = DistinctSketch.from_hashes(s.smallest(), k)
        assert back.smallest() == s.smallest() and back.count() == s.count()
        array_back = DistinctSketch.from_hashes(np.array(s.smallest(), dtype=np.uint64), k)
        assert array_back.smallest() == s.smallest()
        other = build(more, k, 0)
        assert back.merge(other).smallest() == s.copy().merge(other).smallest()
        for h in more:
            s.add(h)
            array_back.add(h)
        assert array_back.smallest() == s.smallest() == bottom_k(hashes + more, k)


@settings(max_examples=100, deadline=None)
@given(hashes=HASHES, extra=HASHES, k=KS, how=HOW, thresholds=st.sampled_from(THRESHOLDS))
def test_copies_are_independent(hashes, extra, k, how, thresholds):
    with representation(*thresholds):
        s = build(hashes, k, how)
        c = s.copy()
        for h in extra:
            c.add(h)
        c.merge(build(extra, k, 1))
        assert s.smallest() == bottom_k(hashes, k)
        empty = DistinctSketch(k).merge(s)  # an empty sketch takes the other's hashes
        for h in extra:
            empty.add(h)
        assert s.smallest() == bottom_k(hashes, k)
        assert empty.smallest() == c.smallest() == bottom_k(hashes + extra, k)


@pytest.mark.parametrize("k", [64, 1024, 4096])
def test_estimate_is_within_the_stated_relative_error(k):
    """Past k the count is an estimate with relative standard error ~ 1/sqrt(k) (uniform
    hashes): every one of 30 seeded runs is within 4 standard errors, and their RMS error is
    about one."""
    errors = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5 * k, 60 * k))
        hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        run = np.unique(hashes)
        (s,) = DistinctSketch.split(run, np.array([0, len(run)]), k)
        error = (s.count() - len(run)) / len(run)
        assert abs(error) < 4 / math.sqrt(k), (seed, error)
        errors.append(error)
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 0.4 / math.sqrt(k) < rms < 1.6 / math.sqrt(k)


def test_an_estimate_does_not_depend_on_how_the_sketch_was_built():
    k = 256
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**64, size=20_000, dtype=np.uint64, endpoint=False).tolist()
    counts = {build(hashes, k, how).count() for how in range(4)}
    assert len(counts) == 1
    (n,) = counts
    assert abs(n - 20_000) / 20_000 < 4 / math.sqrt(k)


def test_a_copy_of_a_batch_sketch_does_not_keep_the_batch_alive():
    batch = np.arange(0, 10_000_000, 7, dtype=np.uint64)
    alive = weakref.ref(batch)
    sketches = DistinctSketch.split(batch, np.array([0, 50, 5_000, len(batch)]), 100)
    copies = [s.copy() for s in sketches]
    del batch, sketches
    gc.collect()
    assert alive() is None
    assert copies[0].smallest() == list(range(0, 350, 7)) and copies[0].count() == 50
    assert copies[1].smallest() == list(range(350, 1050, 7))
    assert copies[2].smallest() == list(range(35_000, 35_700, 7))


def test_invalid_sizes_and_mixed_k_are_rejected():
    with pytest.raises(ValueError):
        DistinctSketch(1)
    with pytest.raises(ValueError):
        DistinctSketch(8).merge(DistinctSketch(16))
