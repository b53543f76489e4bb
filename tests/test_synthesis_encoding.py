"""The byte encoding of a synthesis, ``qis.v1.SynthesisState`` (qis_beam/synthesis/encoding.py).

Stored all-time state and the accumulator coder use it: stored bytes must keep decoding, the
same state must keep giving the same bytes, and pickles go through it. No Beam runner is
involved (the coder in a pipeline is tested with the FnApiRunner in test_backfill.py).
"""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from synthesis_helpers import (
    ALL,
    OPEN,
    PARTIAL,
    RESOLVED,
    THRESHOLDS,
    assert_close,
    fold,
    fold_columns,
    nid,
    packet_st,
    same_state,
    sketch_thresholds,
    split_fold_merge,
    state_of,
    tracked,
)

from qis_beam.proto import state_pb2
from qis_beam.synthesis import NODE_SKETCH_K, Synthesis, SynthesisParams, node_hash

# ----------------------------------------------------------------------------------- encoding


def test_bytes_round_trip():
    s = fold_columns(
        [(i % 7, f"ap{i % 3}", 1 + i % 4, i / 3, (i % 5) / 4, 1000 + i, "t") for i in range(50)]
    )
    s = fold([(99, "ap9", RESOLVED, 2.5, 0.75, 5, "s")], s)  # sets and arrays mixed
    data = s.to_bytes()
    back = Synthesis.from_bytes(data)
    assert back.extract(ALL) == s.extract(ALL)
    assert back.template_id == "s"
    assert back.to_bytes() == data  # canonical encoding
    assert pickle.loads(pickle.dumps(s)).extract(ALL) == s.extract(ALL)
    # the decoded state keeps accumulating like the original
    more = [(100, "ap1", PARTIAL, -1.0, 0.5, 7, "t")]
    assert_close(fold(more, back).extract(ALL), fold(more, s).extract(ALL))
    assert state_of(s).encoding_version == 1


def test_empty_round_trip():
    back = Synthesis.from_bytes(Synthesis().to_bytes())
    assert back.extract(SynthesisParams(min_nodes=0)) == Synthesis().extract(
        SynthesisParams(min_nodes=0)
    )
    assert back.template_id is None


def test_unknown_encoding_version_is_rejected():
    with pytest.raises(ValueError, match="encoding_version"):
        Synthesis.from_bytes(state_pb2.SynthesisState(encoding_version=2).SerializeToString())
    with pytest.raises(ValueError):
        Synthesis.from_bytes(b"")  # version 0
    with pytest.raises(ValueError):
        Synthesis.from_bytes(b"\xff\xff\xff")


# ------------------------------------------------------------------- the byte encoding
# Stored all-time state is this encoding: it must keep decoding, and the same state must keep
# giving the same bytes. GOLDEN_* were written by the encoder as it was before the synthesis
# package was split up (qis_beam/synthesis.py at 52581f3).


def golden_packets():
    return [
        (
            i % 9,
            f"ap{i % 4}",
            1 + i % 4,
            (i - 10) / 4,
            (i % 5) / 4,
            1_700_000_000_000 + 37 * i,
            "tmpl/v2" if i % 3 else "tmpl/v1",
        )
        for i in range(24)
    ]


GOLDEN_DEFAULT = bytes.fromhex(
    "08011207746d706c2f7631181821000000000000274029862c64210b59e03f31d49bdef4a69f3f403900000000"
    "00000f404100000000008011404a0500060606065080d095ffbc3158d3d695ffbc316248d9f62edb7c57ac1469"
    "27d53218070e4cbad0f80fd64dee5de706fa432df005803c12c59fb88deba37a0b81a1f57055af6de0984475a4"
    "04cdb2766d4e156226cdec025ad5528a68d56a540a03617030100619000000000000044021000000000000f4bf"
    "2900000000000004403a306927d53218070e4ce706fa432df005803c12c59fb88deba37a0b81a1f57055af6de0"
    "984475a404cdec025ad5528a68d56a5d0a03617031100619000000000000064021000000000000f53f29000000"
    "000000f63f31000000000000f63f3a306927d53218070e4cbad0f80fd64dee5de706fa432df005807a0b81a1f5"
    "7055afb2766d4e156226cdec025ad5528a68d56a540a0361703210061900000000000008402100000000000006"
    "403100000000000008403a30d9f62edb7c57ac14bad0f80fd64dee5de706fa432df005807a0b81a1f57055af6d"
    "e0984475a404cdb2766d4e156226cd6a4b0a036170331006190000000000000a402100000000008008403a30d9"
    "f62edb7c57ac14bad0f80fd64dee5d3c12c59fb88deba36de0984475a404cdb2766d4e156226cdec025ad5528a"
    "68d5"
)
SMALL_CAPS = {"node_k": 4, "approach_node_k": 2, "max_approaches": 2}
GOLDEN_SMALL_CAPS = bytes.fromhex(
    "08011207746d706c2f7631181821000000000000274029862c64210b59e03f31d49bdef4a69f3f403900000000"
    "00000f404100000000008011404a0500060606065080d095ffbc3158d3d695ffbc316220d9f62edb7c57ac1469"
    "27d53218070e4cbad0f80fd64dee5de706fa432df005806a340a03617030100619000000000000044021000000"
    "000000f4bf2900000000000004403a106927d53218070e4ce706fa432df005806a340a03617032100619000000"
    "00000008402100000000000006403100000000000008403a10d9f62edb7c57ac14bad0f80fd64dee5d"
)
# What GOLDEN_SMALL_CAPS decodes to: 9 distinct nodes seen, estimated from 4 hashes.
GOLDEN_SMALL_CAPS_RECORD = {
    "n_packets": 24,
    "n_nodes": 6,
    "synthesis_paths": 15,
    "total_weight": 11.5,
    "mean_delta": 0.5108695652173914,
    "delta_variance": 2.7498818525519853,
    "success_alpha": 4.875,
    "success_beta": 5.375,
    "success_mean": 0.47560975609756095,
    "outcome_counts": {"RESOLVED": 6, "PARTIAL": 6, "CONTRADICTED": 6, "OPEN": 6},
    "approaches": [
        {
            "approach_id": "ap0",
            "n_packets": 6,
            "n_nodes": 2,
            "total_weight": 2.5,
            "mean_delta": -0.5,
            "success_mean": 0.7777777777777778,
        },
        {
            "approach_id": "ap2",
            "n_packets": 6,
            "n_nodes": 3,
            "total_weight": 3.0,
            "mean_delta": 0.9166666666666666,
            "success_mean": 0.2,
        },
    ],
    "recommended_approach": "ap0",
    "first_event_ms": 1700000000000,
    "last_event_ms": 1700000000851,
    "suppressed": False,
}


@pytest.mark.parametrize(
    ("caps", "golden"), [({}, GOLDEN_DEFAULT), (SMALL_CAPS, GOLDEN_SMALL_CAPS)]
)
def test_encoding_is_byte_identical_to_the_stored_golden(caps, golden):
    packets = golden_packets()
    one = fold(packets, Synthesis(**caps))
    assert one.to_bytes() == golden
    # other ways of building the same state write the same bytes, up to float rounding
    for other in (
        fold_columns(packets, Synthesis(**caps)),
        split_fold_merge(packets, [5, 17], [True, False], 3, **caps),
    ):
        assert other.to_bytes() == golden or same_state(other, one)
    back = Synthesis.from_bytes(golden, **caps)
    assert back.to_bytes() == golden
    assert back.extract(ALL) == one.extract(ALL)
    assert pickle.loads(pickle.dumps(back)).to_bytes() == golden


def test_stored_golden_state_decodes_to_its_record():
    back = Synthesis.from_bytes(GOLDEN_SMALL_CAPS, **SMALL_CAPS)
    assert back.extract(ALL) == GOLDEN_SMALL_CAPS_RECORD
    assert back.template_id == "tmpl/v1"
    record = Synthesis.from_bytes(GOLDEN_DEFAULT).extract(ALL)
    assert record["n_nodes"] == 9
    assert [a["approach_id"] for a in record["approaches"]] == ["ap0", "ap3", "ap1", "ap2"]
    # decoded state keeps accumulating and merging like the state it was written from
    more = [(40 + i, "ap1", PARTIAL, -1.0, 0.5, 7, "tmpl/v0") for i in range(5)]
    expected = fold(more, fold(golden_packets())).extract(ALL)
    assert_close(fold(more, Synthesis.from_bytes(GOLDEN_DEFAULT)).extract(ALL), expected)
    assert_close(Synthesis.from_bytes(GOLDEN_DEFAULT).merge(fold(more)).extract(ALL), expected)


def split_encode_merge(packets, cuts, modes, order_seed, **caps) -> Synthesis:
    """Like ``split_fold_merge``, but every part also goes through to_bytes / from_bytes and
    copies, as partials do in the pipeline."""
    bounds = sorted({0, len(packets), *(c % (len(packets) + 1) for c in cuts)})
    parts = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        folder = fold_columns if modes[i % len(modes)] else fold
        part = folder(packets[lo:hi], Synthesis(**caps))
        if i % 3 == 1:
            part = Synthesis.from_bytes(part.to_bytes(), **caps)
        parts.append(part)
    rng = random.Random(order_seed)
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        a = Synthesis(**caps).merge(parts[i]) if rng.random() < 0.5 else parts[i].copy()
        merged = a.merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0] if parts else Synthesis(**caps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(
        st.tuples(
            st.integers(0, 300),
            st.sampled_from(["a", "b", "c", "d", "e", "é", ""]),
            st.integers(1, 4),
            st.one_of(st.floats(-5, 5), st.just(-0.0)),
            st.one_of(st.just(0.0), st.floats(0, 1)),
            st.integers(-(10**13), 10**13),
            st.sampled_from(["t1", "t2", ""]),
        ),
        max_size=250,
    ),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    modes=st.lists(st.booleans(), min_size=1, max_size=3),
    order_seed=st.integers(0, 2**32),
    caps=st.sampled_from(
        [{}, {"node_k": 8, "approach_node_k": 4, "max_approaches": 3}, {"node_k": 100}]
    ),
)
def test_small_and_large_sketch_paths_agree(packets, cuts, modes, order_seed, caps):
    results = []
    for thresholds in THRESHOLDS:
        with sketch_thresholds(*thresholds):
            merged = split_encode_merge(packets, cuts, modes, order_seed, **caps)
            data = merged.to_bytes()
            assert Synthesis.from_bytes(data, **caps).to_bytes() == data
            results.append((data, merged.extract(ALL)))
    one = fold(packets, Synthesis(**caps))
    exact = sorted({node_hash(nid(p[0])) for p in packets})
    for data, record in results:
        # the same partials merged in the same order: identical whatever holds the sketches
        assert data == results[0][0]
        assert record == results[0][1]
        assert_close(record, one.extract(ALL))
        assert state_of_bytes(data).node_hashes == exact[: caps.get("node_k", NODE_SKETCH_K)]


def state_of_bytes(data: bytes) -> state_pb2.SynthesisState:
    return state_pb2.SynthesisState.FromString(data)


uint64 = st.integers(0, 2**64 - 1)
any_double = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5e-324, float("nan"), -float("inf")]),
)
small_or_big = st.one_of(st.integers(0, 200), uint64)
sorted_hashes = st.lists(uint64, max_size=90, unique=True).map(sorted)
approach_msg = st.builds(
    state_pb2.ApproachState,
    approach_id=st.text(max_size=140),
    n_packets=small_or_big,
    total_weight=any_double,
    weighted_delta_sum=any_double,
    success_sum=any_double,
    failure_sum=any_double,
    node_hashes=st.one_of(st.lists(uint64, max_size=18, unique=True).map(sorted), sorted_hashes),
)


@st.composite
def canonical_states(draw) -> bytes:
    """Encodings ``to_bytes`` would write: hashes sorted and distinct (at most the default K),
    approaches unique and by id, five outcome counts, event times only with packets."""
    n = draw(small_or_big)
    approaches = {a.approach_id: a for a in draw(st.lists(approach_msg, max_size=8))}
    msg = state_pb2.SynthesisState(
        encoding_version=1,
        template_id=draw(st.text(max_size=150)),
        n_packets=n,
        total_weight=draw(any_double),
        mean_delta=draw(any_double),
        m2_delta=draw(any_double),
        success_sum=draw(any_double),
        failure_sum=draw(any_double),
        outcome_counts=draw(st.lists(small_or_big, min_size=5, max_size=5)),
        node_hashes=draw(sorted_hashes),
        approaches=[approaches[aid] for aid in sorted(approaches)],
    )
    if n:
        msg.first_event_ms = draw(st.integers(-(2**63), 2**63 - 1))
        msg.last_event_ms = draw(st.integers(-(2**63), 2**63 - 1))
    return msg.SerializeToString(deterministic=True)


def scrambled(data: bytes, seed: int) -> bytes:
    """The same state written non-canonically: hashes shuffled and repeated, approaches in
    another order (as another writer, or a future one, may)."""
    rng = random.Random(seed)
    msg = state_pb2.SynthesisState.FromString(data)

    def shuffle(hashes):
        h = list(hashes) + list(hashes)[: rng.randint(0, len(hashes))]
        rng.shuffle(h)
        return h

    msg.node_hashes[:] = shuffle(msg.node_hashes)
    approaches = list(msg.approaches)
    rng.shuffle(approaches)
    del msg.approaches[:]
    for a in approaches:
        a.node_hashes[:] = shuffle(a.node_hashes)
        msg.approaches.append(a)
    return msg.SerializeToString()


def assertsame_state(a: Synthesis, b: Synthesis):
    assert a.to_bytes() == b.to_bytes()
    assert (a.n_packets, a.first_event_ms, a.last_event_ms, a.template_id) == (
        b.n_packets,
        b.first_event_ms,
        b.last_event_ms,
        b.template_id,
    )
    assert tracked(a) == tracked(b)
    assert a.n_nodes == b.n_nodes
    assert repr(a.extract(ALL)) == repr(b.extract(ALL))  # repr: nan-safe


# Success sums of +max and -max double (no fold writes negative sums): the denominators of an
# approach's and of the address's success mean add up to 0 (extract raised ZeroDivisionError).
_APPROACH_SUMS_CANCEL = (
    b"\x08\x01J\x05\x00\x00\x00\x00\x00j\x14\x10\x01)"
    b"\xff\xff\xff\xff\xff\xff\xef\x7f1\xff\xff\xff\xff\xff\xff\xef\xff"
)
_ADDRESS_SUMS_CANCEL = (
    b"\x08\x019\xff\xff\xff\xff\xff\xff\xef\x7fA"
    b"\xff\xff\xff\xff\xff\xff\xef\xffJ\x05\x00\x00\x00\x00\x00"
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=canonical_states(), thresholds=st.sampled_from(THRESHOLDS), seed=st.integers(0, 99))
@example(data=_APPROACH_SUMS_CANCEL, thresholds=THRESHOLDS[0], seed=0)
@example(data=_ADDRESS_SUMS_CANCEL, thresholds=THRESHOLDS[0], seed=0)
def test_canonical_encodings_round_trip_byte_for_byte(data, thresholds, seed):
    with sketch_thresholds(*thresholds):
        s = Synthesis.from_bytes(data)
        assert s.to_bytes() == data
        assertsame_state(s, Synthesis.from_bytes(scrambled(data, seed)))
        assert s.copy().to_bytes() == data
        assert pickle.loads(pickle.dumps(s)).to_bytes() == data
        # (merging is not an identity for every encodable state: zero weight drops M2)
        merged = Synthesis().merge(s)
        assertsame_state(merged, Synthesis().merge(Synthesis.from_bytes(data)))


def test_edge_values_survive_the_encoding():
    s = fold([(i, f"ap{i % 3}", 1 + i % 4, i / 3, (i % 5) / 4, 1000 + i, "t") for i in range(60)])
    s.add(nid(1), "x" * 300, RESOLVED, 1.0, 1.0, 5, "t")  # a record longer than 127 bytes
    s.add(nid(2), "", OPEN, -0.0, 0.0, 6, "t")  # the empty id
    for i in range(200):  # a sketch held as an array
        s.add_hashed(node_hash(nid(1000 + i)), "ap1", OPEN, 0.0, 0.0, 7, "t")
    s.total_weight = -0.0  # written (only +0.0 is the default)
    s.mean_delta = float("nan")
    s.m2_delta = float("inf")
    s.failure_sum = 5e-324
    s.outcome_counts = [0, 2**64 - 1, 128, 0, 1]
    s.first_event_ms = np.int64(-(2**63))  # numpy integers are accepted
    s.last_event_ms = 0
    s.template_id = "é" * 200
    data = s.to_bytes()
    msg = state_of_bytes(data)
    assert math.copysign(1.0, msg.total_weight) == -1.0 and math.isnan(msg.mean_delta)
    assert (msg.m2_delta, msg.failure_sum) == (math.inf, 5e-324)
    assert list(msg.outcome_counts) == [0, 2**64 - 1, 128, 0, 1]
    assert (msg.first_event_ms, msg.last_event_ms) == (-(2**63), 0)
    assert msg.template_id == "é" * 200
    assert [a.approach_id for a in msg.approaches] == sorted(["", "ap0", "ap1", "ap2", "x" * 300])
    back = Synthesis.from_bytes(data)
    assert back.to_bytes() == data
    assert repr(back.extract(ALL)) == repr(s.extract(ALL))
    s.first_event_ms = 2**63
    with pytest.raises(ValueError):
        s.to_bytes()


@settings(max_examples=100, deadline=None)
@given(
    packets=st.lists(packet_st, max_size=60),
    extra=st.lists(packet_st, max_size=10),
    use_columns=st.booleans(),
    thresholds=st.sampled_from(THRESHOLDS),
)
def test_copies_and_merged_parts_are_independent(packets, extra, use_columns, thresholds):
    with sketch_thresholds(*thresholds):
        s = (fold_columns if use_columns else fold)(packets)
        s = s if len(packets) % 2 else Synthesis.from_bytes(s.to_bytes())
        before = s.to_bytes()
        c = s.copy()
        m = Synthesis().merge(s)
        for t in (c, m):
            fold(extra, t)
            t.merge(fold(extra))
        assert s.to_bytes() == before
        assert c.to_bytes() == m.to_bytes()
        assert_close(c.extract(ALL), fold(extra + extra, fold(packets)).extract(ALL))


def test_pickle_is_the_versioned_encoding():
    s = fold([(1, "a", RESOLVED, 1.0, 1.0, 1, "t")])
    fn, args = s.__reduce__()
    assert args == (s.to_bytes(),)
    capped = fold([(1, "a", RESOLVED, 1.0, 1.0, 1, "t")], Synthesis(node_k=16, max_approaches=2))
    back = pickle.loads(pickle.dumps(capped))
    assert (back.node_k, back.approach_node_k, back.max_approaches) == (16, 1024, 2)
    assert back.to_bytes() == capped.to_bytes()
    # pickles from before (Synthesis.from_bytes as the reducer) still load
    assert pickle.loads(pickle.dumps(OldPickle(s))).to_bytes() == s.to_bytes()
    # ... and so do those written before synthesis was a package (reducer at the old path)
    data = s.to_bytes()
    old = b"cqis_beam.synthesis\n_unpickle\n(B" + len(data).to_bytes(4, "little") + data + b"tR."
    assert pickle.loads(old).to_bytes() == data


class OldPickle:
    def __init__(self, s: Synthesis):
        self.s = s

    def __reduce__(self):
        return (Synthesis.from_bytes, (self.s.to_bytes(), 4096, 1024, 256))
