"""The batch duplicate rule: smallest payload wins, order and sharding never matter."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.dedupe import (
    ENTRY,
    decide,
    dedupe,
    packet_id_prefixes,
    payload_digest,
    payload_digests,
    repeated_runs,
)


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


# The backfill's compact path (qis_beam.transforms.ingest): entries carry only the first 8
# bytes of a packet_id, so different ids sharing them must still be told apart exactly.
SAME_PREFIX = [bytes(8) + b"\x01" * 8, bytes(8) + b"\x02" * 8, b"\x05" * 16]


def compact_verdict(copies):
    """[(packet_id, payload)] at positions ("f", i) -> (kept, duplicates, conflicts) as the
    backfill decides them from 24-byte entries; a payload starts with its packet_id."""
    records = {("f", i): payload for i, (_, payload) in enumerate(copies)}
    entries = np.zeros(len(copies), dtype=ENTRY)
    entries["id"] = packet_id_prefixes([pid for pid, _ in copies])
    digests = b"".join(payload_digest(payload, b"k" * 16) for _, payload in copies)
    assert digests == payload_digests([payload for _, payload in copies], b"k" * 16)
    entries["digest"] = np.frombuffer(digests, "<u8")
    entries["rel"] = np.arange(len(copies))
    not_kept, conflicts, duplicates = set(), set(), 0
    for run in repeated_runs(entries):
        verdict = decide(
            [(int(entries["digest"][i]), ("f", int(i))) for i in run],
            lambda positions: {p: records[p] for p in positions},
            identity,
            lambda payload: payload[:16],
        )
        duplicates += len(verdict.duplicates)
        not_kept.update(verdict.duplicates)
        for position, record, pid in verdict.conflicts:
            not_kept.add(position)
            conflicts.add((pid, record, f"src{position[1]}"))
    kept = {}
    for i, (pid, payload) in enumerate(copies):
        if ("f", i) not in not_kept:
            assert pid not in kept, "two copies of one packet_id kept"
            kept[pid] = payload
    return kept, duplicates, conflicts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SAME_PREFIX), st.sampled_from([b"A", b"B"]))))
def test_compact_entries_agree_with_the_rule_when_packet_ids_share_a_prefix(drawn):
    copies = [(pid, pid + body) for pid, body in drawn]
    reference = dedupe([(pid, p, f"src{i}") for i, (pid, p) in enumerate(copies)], identity)
    kept, duplicates, conflicts = compact_verdict(copies)
    assert kept == reference.kept
    assert duplicates == reference.duplicates
    assert conflicts == set(reference.conflicts)


def test_different_packet_ids_sharing_a_prefix_are_not_duplicates():
    a, b = SAME_PREFIX[0], SAME_PREFIX[1]
    kept, duplicates, conflicts = compact_verdict([(a, a + b"X"), (b, b + b"Y"), (b, b + b"Y")])
    assert kept == {a: a + b"X", b: b + b"Y"} and duplicates == 1 and conflicts == set()
