"""The batch duplicate rule: smallest payload wins, order and sharding never matter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.dedupe import dedupe


def identity(record: bytes) -> bytes:
    return record


def test_identical_copies_are_duplicates():
    result = dedupe([(b"p1", b"A", "f1"), (b"p1", b"A", "f2"), (b"p2", b"B", "f1")], identity)
    assert result.kept == {b"p1": b"A", b"p2": b"B"}
    assert result.duplicates == 1 and result.conflicts == []


def test_conflict_keeps_smallest_payload_and_dead_letters_every_other_copy():
    copies = [(b"p", b"C", "f1"), (b"p", b"B", "f2"), (b"p", b"C", "f3"), (b"p", b"B", "f4")]
    result = dedupe(copies, identity)
    assert result.kept == {b"p": b"B"}
    assert result.duplicates == 1  # the second B
    assert sorted(result.conflicts) == [(b"p", b"C", "f1"), (b"p", b"C", "f3")]


copies_strategy = st.lists(
    st.tuples(st.sampled_from([b"p1", b"p2", b"p3"]), st.sampled_from([b"A", b"B", b"C"])),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(copies_strategy, st.randoms())
def test_verdict_does_not_depend_on_order_or_sharding(copies, rnd):
    tagged = [(pid, payload, f"src{i}") for i, (pid, payload) in enumerate(copies)]
    reference = dedupe(tagged, identity)
    shuffled = tagged[:]
    rnd.shuffle(shuffled)
    again = dedupe(shuffled, identity)
    assert again.kept == reference.kept
    assert again.duplicates == reference.duplicates
    assert sorted(again.conflicts) == sorted(reference.conflicts)
    # every copy lands in exactly one place
    assert len(reference.kept) + reference.duplicates + len(reference.conflicts) == len(copies)
    for pid in {pid for pid, _ in copies}:
        assert reference.kept[pid] == min(p for q, p in copies if q == pid)
