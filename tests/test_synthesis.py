"""Synthesis math (spec section 5): formulas, ranking, mergeability, encoding and caps."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qis_beam import synthesis
from qis_beam.proto import state_pb2
from qis_beam.synthesis import (
    MAX_TRACKED_APPROACHES,
    NODE_SKETCH_K,
    OUTCOME_NAMES,
    Synthesis,
    SynthesisParams,
    approach_hash,
    node_hash,
    node_hash_array,
    synthesize_columns,
)

RESOLVED, PARTIAL, CONTRADICTED, OPEN = 1, 2, 3, 4
KEYS = {
    "n_packets",
    "n_nodes",
    "synthesis_paths",
    "total_weight",
    "mean_delta",
    "delta_variance",
    "success_alpha",
    "success_beta",
    "success_mean",
    "outcome_counts",
    "approaches",
    "recommended_approach",
    "first_event_ms",
    "last_event_ms",
    "suppressed",
}
ALL = SynthesisParams(min_support=1, top_k=1000, min_nodes=0)


def nid(i: int) -> bytes:
    """A node id as the spec makes them: a SHA-256 prefix (so hashes are uniform)."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest()[:16]


def fold(packets, synthesis: Synthesis | None = None) -> Synthesis:
    """Packets are (node, approach, outcome, delta, confidence, event_ms, template)."""
    s = synthesis if synthesis is not None else Synthesis()
    for node, approach, outcome, delta, conf, t, template in packets:
        s.add(nid(node), approach, outcome, delta, conf, t, template)
    return s


def fold_columns(packets, synthesis: Synthesis | None = None) -> Synthesis:
    s = synthesis if synthesis is not None else Synthesis()
    by_template: dict[str, list] = {}
    for p in packets:
        by_template.setdefault(p[6], []).append(p)
    for template, ps in by_template.items():
        s.add_columns(
            node_hash_array([nid(p[0]) for p in ps]),
            [p[1] for p in ps],
            np.array([p[2] for p in ps]),
            np.array([p[3] for p in ps], dtype=np.float64),
            np.array([p[4] for p in ps], dtype=np.float64),
            np.array([p[5] for p in ps], dtype=np.int64),
            template,
        )
    return s


def assert_close(a, b, path="record"):
    """Equal, floats within rel 1e-9 / abs 1e-9; the types must agree too (JSON-ready)."""
    if isinstance(a, float) or isinstance(b, float):
        assert type(a) is float and type(b) is float, (path, a, b)
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (path, a, b)
    elif isinstance(a, dict):
        assert type(b) is dict and a.keys() == b.keys(), (path, a, b)
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert type(b) is list and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def assert_plain_json(value):
    """Only Python scalars, lists, dicts and None: no numpy types anywhere."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            assert_plain_json(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain_json(v)
    else:
        assert value is None or type(value) in (int, float, str, bool), (value, type(value))
    json.dumps(value)


# ------------------------------------------------------------------------ hand-computed cases


def three_packets() -> Synthesis:
    # w = 0.5, 1.0, 0.25; d = 2, -1, 4; RESOLVED, PARTIAL, OPEN; three nodes.
    return fold(
        [
            (1, "a", RESOLVED, 2.0, 0.5, 300, "t"),
            (2, "a", PARTIAL, -1.0, 1.0, 100, "t"),
            (3, "a", OPEN, 4.0, 0.25, 200, "t"),
        ]
    )


def test_hand_computed_formulas():
    r = three_packets().extract(ALL)
    assert set(r) == KEYS
    assert r["n_packets"] == 3
    assert r["n_nodes"] == 3
    assert r["synthesis_paths"] == 3
    assert r["total_weight"] == pytest.approx(1.75)
    # sum w*d = 1 - 1 + 1 = 1  ->  mean = 1 / 1.75 = 4/7
    assert r["mean_delta"] == pytest.approx(4 / 7, rel=1e-12)
    # sum w (d - 4/7)^2 = 0.5*(10/7)^2 + 1*(11/7)^2 + 0.25*(24/7)^2 = (50 + 121 + 144)/49 = 45/7
    assert r["delta_variance"] == pytest.approx((45 / 7) / 1.75, rel=1e-12)
    # OPEN excluded: alpha = 1 + 0.5*1 + 1*0.5 = 2; beta = 1 + 0.5*0 + 1*0.5 = 1.5
    assert r["success_alpha"] == pytest.approx(2.0)
    assert r["success_beta"] == pytest.approx(1.5)
    assert r["success_mean"] == pytest.approx(2.0 / 3.5)
    assert r["outcome_counts"] == {"RESOLVED": 1, "PARTIAL": 1, "CONTRADICTED": 0, "OPEN": 1}
    assert r["first_event_ms"] == 100 and r["last_event_ms"] == 300
    assert r["suppressed"] is False
    (a,) = r["approaches"]
    assert a == {
        "approach_id": "a",
        "n_packets": 3,
        "n_nodes": 3,
        "total_weight": pytest.approx(1.75),
        "mean_delta": pytest.approx(4 / 7),
        # (1 + 1.0) / (2 + 0.5 + 1.0): the OPEN packet's weight is not in the posterior
        "success_mean": pytest.approx(2.0 / 3.5),
    }
    assert r["recommended_approach"] == "a"
    assert_plain_json(r)


def test_batched_path_matches_hand_computed():
    packets = [
        (1, "a", RESOLVED, 2.0, 0.5, 300, "t"),
        (2, "a", PARTIAL, -1.0, 1.0, 100, "t"),
        (3, "a", OPEN, 4.0, 0.25, 200, "t"),
    ]
    r = fold_columns(packets).extract(ALL)
    assert_close(r, three_packets().extract(ALL))
    assert_plain_json(r)


def test_contradicted_and_weights_in_beta_posterior():
    s = fold(
        [
            (1, "x", CONTRADICTED, -3.0, 0.8, 1, "t"),
            (1, "x", RESOLVED, 1.0, 0.2, 2, "t"),
            (2, "x", OPEN, 9.0, 1.0, 3, "t"),
            (2, "x", OPEN, -9.0, 1.0, 4, "t"),
        ]
    )
    r = s.extract(ALL)
    assert r["success_alpha"] == pytest.approx(1.2)  # 1 + 0.2
    assert r["success_beta"] == pytest.approx(1.8)  # 1 + 0.8
    assert r["success_mean"] == pytest.approx(0.4)
    assert r["approaches"][0]["success_mean"] == pytest.approx(1.2 / 3.0)
    # the OPEN packets still count in the delta statistics: sum w d = -2.4 + 0.2 + 9 - 9
    assert r["mean_delta"] == pytest.approx(-2.2 / 3.0)
    assert r["n_nodes"] == 2 and r["synthesis_paths"] == 1
    assert r["outcome_counts"] == {"RESOLVED": 1, "PARTIAL": 0, "CONTRADICTED": 1, "OPEN": 2}


def test_synthesis_paths_grow_quadratically():
    for n in (0, 1, 2, 5, 40):
        s = fold([(i, "a", RESOLVED, 0.0, 1.0, 1, "t") for i in range(n)])
        r = s.extract(ALL)
        assert r["n_nodes"] == n
        assert r["synthesis_paths"] == n * (n - 1) // 2
        assert type(r["synthesis_paths"]) is int


def test_zero_total_weight_gives_null_mean_and_variance():
    s = fold([(1, "a", RESOLVED, 5.0, 0.0, 1, "t"), (2, "a", OPEN, -5.0, 0.0, 2, "t")])
    r = s.extract(ALL)
    assert r["total_weight"] == 0.0
    assert r["mean_delta"] is None and r["delta_variance"] is None
    assert r["success_alpha"] == 1.0 and r["success_beta"] == 1.0 and r["success_mean"] == 0.5
    assert r["approaches"][0]["mean_delta"] is None
    assert r["approaches"][0]["success_mean"] == 0.5
    # a zero-weight part merged into a weighted one changes nothing weighted
    t = fold([(3, "a", RESOLVED, 1.0, 0.5, 3, "t"), (4, "a", RESOLVED, 3.0, 0.5, 4, "t")])
    t.merge(s)
    r = t.extract(ALL)
    assert r["mean_delta"] == pytest.approx(2.0) and r["delta_variance"] == pytest.approx(1.0)
    assert r["n_packets"] == 4


def test_empty_synthesis_extracts_cleanly():
    s = Synthesis()
    assert s.extract() == {"n_packets": 0, "n_nodes": 0, "suppressed": True}
    r = s.extract(SynthesisParams(min_nodes=0))
    assert set(r) == KEYS
    assert r["n_packets"] == 0 and r["n_nodes"] == 0 and r["synthesis_paths"] == 0
    assert r["mean_delta"] is None and r["delta_variance"] is None
    assert r["first_event_ms"] is None and r["last_event_ms"] is None
    assert r["approaches"] == [] and r["recommended_approach"] is None
    assert r["outcome_counts"] == {name: 0 for name in OUTCOME_NAMES.values()}
    assert_plain_json(r)
    assert Synthesis.merge_all([]).n_packets == 0


def test_min_nodes_suppression_keeps_only_counts():
    s = fold([(1, "a", RESOLVED, 1.0, 1.0, 1, "t"), (2, "a", RESOLVED, 1.0, 1.0, 2, "t")] * 2)
    assert s.extract(SynthesisParams(min_nodes=3)) == {
        "n_packets": 4,
        "n_nodes": 2,
        "suppressed": True,
    }
    r = s.extract(SynthesisParams(min_nodes=2))
    assert r["suppressed"] is False and set(r) == KEYS


def test_invalid_inputs_are_rejected():
    s = Synthesis()
    with pytest.raises(ValueError):
        s.add(nid(1), "a", 0, 1.0, 1.0, 1, "t")
    with pytest.raises(ValueError):
        s.add(nid(1), "a", 5, 1.0, 1.0, 1, "t")
    with pytest.raises(ValueError):
        s.add(nid(1), "a", 1, 1.0, float("nan"), 1, "t")
    with pytest.raises(ValueError):
        s.add_columns(
            np.array([1], dtype=np.uint64),
            ["a"],
            np.array([7]),
            np.ones(1),
            np.ones(1),
            np.ones(1, dtype=np.int64),
            "t",
        )
    assert s.n_packets == 0


def test_template_id_keeps_the_smallest():
    s = fold([(1, "a", RESOLVED, 1.0, 1.0, 1, "t2"), (1, "a", RESOLVED, 1.0, 1.0, 1, "t1")])
    assert s.template_id == "t1"
    u = fold([(1, "a", RESOLVED, 1.0, 1.0, 1, "t3")]).merge(s)
    assert u.template_id == "t1"


def test_node_hash_is_big_endian_prefix():
    node = bytes(range(16))
    assert node_hash(node) == 0x0001020304050607
    assert node_hash_array([node, nid(3)]).tolist() == [node_hash(node), node_hash(nid(3))]
    odd = [b"\x00" * 16, b"\x01" * 24, b"\x02" * 8, b"\x03" * 3]  # also short ids, slow path
    assert node_hash_array(odd).tolist() == [node_hash(x) for x in odd]
    assert node_hash_array(odd[:3]).dtype == np.uint64


# ------------------------------------------------------------------------------------- ranking


def approach_packets(approach, outcomes_deltas, node0=0):
    return [
        (node0 + i, approach, o, d, 1.0, 10 + i, "t") for i, (o, d) in enumerate(outcomes_deltas)
    ]


def test_ranking_by_success_mean_then_delta_then_id():
    packets = (
        approach_packets("high", [(RESOLVED, 0.0)] * 3)  # success (1+3)/(2+3) = 0.8
        + approach_packets("mid-b", [(PARTIAL, 2.0)] * 3)  # 0.5, mean 2
        + approach_packets("mid-a", [(PARTIAL, 1.0)] * 3)  # 0.5, mean 1
        + approach_packets("tie-z", [(PARTIAL, 1.0)] * 3)  # 0.5, mean 1: id breaks the tie
        + approach_packets("low", [(CONTRADICTED, 9.0)] * 3)  # 0.2
    )
    r = fold(packets).extract(SynthesisParams())
    ids = [a["approach_id"] for a in r["approaches"]]
    assert ids == ["high", "mid-b", "mid-a", "tie-z", "low"]
    assert r["recommended_approach"] == "high"
    assert [a["success_mean"] for a in r["approaches"]] == pytest.approx([0.8, 0.5, 0.5, 0.5, 0.2])


def test_null_mean_delta_ranks_after_any_number():
    packets = [(i, "zero-w", PARTIAL, 5.0, 0.0, 1, "t") for i in range(3)]  # 0.5, mean None
    packets += approach_packets("neg", [(RESOLVED, -5.0), (CONTRADICTED, -5.0)] * 2)[:3]
    # "neg": R, C, R -> success (1 + 2) / (2 + 3) = 0.6; make a 0.5 one with a negative mean:
    packets += approach_packets("half", [(PARTIAL, -100.0)] * 3)
    r = fold(packets).extract(SynthesisParams())
    assert [a["approach_id"] for a in r["approaches"]] == ["neg", "half", "zero-w"]
    assert r["approaches"][2]["mean_delta"] is None


def test_min_support_top_k_and_no_recommendation():
    packets = approach_packets("three", [(RESOLVED, 1.0)] * 3) + approach_packets(
        "two", [(RESOLVED, 1.0)] * 2
    )
    s = fold(packets)
    assert [a["approach_id"] for a in s.extract(SynthesisParams())["approaches"]] == ["three"]
    assert [a["approach_id"] for a in s.extract(ALL)["approaches"]] == ["three", "two"]
    r = s.extract(SynthesisParams(min_support=4))
    assert r["approaches"] == [] and r["recommended_approach"] is None
    many = fold([p for i in range(12) for p in approach_packets(f"a{i:02d}", [(RESOLVED, i)] * 3)])
    r = many.extract(SynthesisParams(top_k=10))
    assert len(r["approaches"]) == 10
    assert r["recommended_approach"] == "a11"  # equal success: highest mean delta first
    assert many.extract(SynthesisParams(top_k=0))["recommended_approach"] is None


def test_ranking_ignores_summation_order_noise():
    # Mathematically tied approaches whose sums are accumulated in different orders.
    ws = [0.1, 0.2, 0.7, 0.3]
    packets = [(i, "b", RESOLVED, 1.0, w, 1, "t") for i, w in enumerate(ws)]
    packets += [(i, "a", RESOLVED, 1.0, w, 1, "t") for i, w in enumerate(reversed(ws))]
    assert fold(packets).extract()["recommended_approach"] == "a"
    assert fold(packets[::-1]).extract()["recommended_approach"] == "a"


# ------------------------------------------------------------------------------- mergeability

packet_st = st.tuples(
    st.integers(0, 9),  # node
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(1, 4),
    st.one_of(st.floats(-100, 100), st.integers(-5, 5).map(float)),
    st.one_of(st.just(0.0), st.sampled_from([0.25, 0.5, 1.0]), st.floats(0.01, 1.0)),
    st.integers(1, 10**13),
    st.sampled_from(["t1", "t2"]),
)


def split_fold_merge(packets, cuts, modes, order_seed, **caps) -> Synthesis:
    """Fold random parts (each by add or add_columns), then merge them in a random tree."""
    bounds = sorted({0, len(packets), *(c % (len(packets) + 1) for c in cuts)})
    parts = []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        folder = fold_columns if modes[i % len(modes)] else fold
        parts.append(folder(packets[lo:hi], Synthesis(**caps)))
    parts.append(Synthesis(**caps))  # an empty part must be neutral
    rng = random.Random(order_seed)
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        merged = parts[i].merge(parts[j]) if rng.random() < 0.5 else parts[i].copy().merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packets=st.lists(packet_st, max_size=40),
    cuts=st.lists(st.integers(0, 100), max_size=6),
    modes=st.lists(st.booleans(), min_size=1, max_size=4),
    order_seed=st.integers(0, 2**32),
)
def test_any_split_and_merge_order_equals_one_pass(packets, cuts, modes, order_seed):
    one = fold(packets)
    merged = split_fold_merge(packets, cuts, modes, order_seed)
    assert_close(merged.extract(ALL), one.extract(ALL))
    assert_close(merged.extract(), one.extract())
    assert merged.template_id == one.template_id
    assert Synthesis.merge_all([fold(packets[:3]), fold(packets[3:])]).n_packets == len(packets)


@settings(max_examples=60, deadline=None)
@given(
    packets=st.lists(
        st.tuples(
            st.integers(0, 120),
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.integers(1, 4),
            st.floats(-1, 1),
            st.floats(0, 1, width=32),  # confidence is a float32 on the wire
            st.integers(1, 100),
            st.just("t"),
        ),
        max_size=150,
    ),
    cuts=st.lists(st.integers(0, 200), max_size=5),
    modes=st.lists(st.booleans(), min_size=1, max_size=3),
    order_seed=st.integers(0, 2**32),
)
def test_small_caps_merge_to_the_same_bottom_k(packets, cuts, modes, order_seed):
    # Caps small enough that thresholds, lazy pruning and approach eviction are exercised.
    caps = {"node_k": 8, "approach_node_k": 4, "max_approaches": 2}
    one = fold(packets, Synthesis(**caps))
    merged = split_fold_merge(packets, cuts, modes, order_seed, **caps)
    assert merged.to_bytes() == one.to_bytes() or _same_state(merged, one)
    assert_close(merged.extract(ALL), one.extract(ALL))
    exact = np.unique(node_hash_array([nid(p[0]) for p in packets]))
    assert state_of(one).node_hashes == exact[:8].tolist()
    seen = sorted({p[1] for p in packets}, key=lambda a: (approach_hash(a), a))
    assert merged.tracked_approaches == one.tracked_approaches == sorted(seen[:2])


def state_of(s: Synthesis) -> state_pb2.SynthesisState:
    st_ = state_pb2.SynthesisState()
    st_.ParseFromString(s.to_bytes())
    return st_


def _same_state(a: Synthesis, b: Synthesis) -> bool:
    """Equal encodings up to float rounding of the sums (integers and hashes exactly)."""
    x, y = state_of(a), state_of(b)
    assert x.node_hashes == y.node_hashes and x.outcome_counts == y.outcome_counts
    assert [p.approach_id for p in x.approaches] == [p.approach_id for p in y.approaches]
    for p, q in zip(x.approaches, y.approaches, strict=True):
        assert p.node_hashes == q.node_hashes and p.n_packets == q.n_packets
    return True


@settings(max_examples=60, deadline=None)
@given(
    packets=st.lists(
        st.tuples(st.sampled_from(["x", "y", "z"]), packet_st), min_size=1, max_size=60
    )
)
def test_synthesize_columns_equals_per_packet_add(packets):
    expected: dict[str, Synthesis] = {}
    for address, p in packets:
        fold([p], expected.setdefault(address, Synthesis()))
    got = synthesize_columns(
        [a for a, _ in packets],
        [p[6] for _, p in packets],
        node_hash_array([nid(p[0]) for _, p in packets]),
        [p[1] for _, p in packets],
        np.array([p[2] for _, p in packets]),
        np.array([p[3] for _, p in packets]),
        np.array([p[4] for _, p in packets]),
        np.array([p[5] for _, p in packets]),
    )
    assert got.keys() == expected.keys()
    for address, s in expected.items():
        assert_close(got[address].extract(ALL), s.extract(ALL), address)
        assert got[address].template_id == s.template_id
        assert_plain_json(got[address].extract(ALL))


def test_synthesize_columns_accepts_codes_and_vocabulary():
    got = synthesize_columns(
        np.array(["x", "x", "y"]),
        "t",
        node_hash_array([nid(1), nid(2), nid(1)]),
        (np.array([1, 0, 1]), ["p", "q"]),
        np.array([RESOLVED, PARTIAL, OPEN]),
        np.array([1.0, 2.0, 3.0]),
        np.array([1.0, 1.0, 1.0]),
        np.array([5, 6, 7]),
    )
    rx = got["x"].extract(ALL)
    assert rx["n_packets"] == 2 and rx["n_nodes"] == 2
    assert {a["approach_id"]: a["n_packets"] for a in rx["approaches"]} == {"p": 1, "q": 1}
    assert got["y"].extract(ALL)["approaches"][0]["approach_id"] == "q"
    assert got["y"].template_id == "t"


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


# ----------------------------------------------------------------------------------- the caps


def test_node_count_exact_below_k_and_estimated_above():
    k = 256
    s = fold([(i, "a", RESOLVED, 0.0, 1.0, 1, "t") for i in range(k - 1)], Synthesis(node_k=k))
    assert s.n_nodes == k - 1
    assert NODE_SKETCH_K == 4096
    # Default K: 40 000 distinct nodes (relative error ~ 1/sqrt(K) = 1.6%).
    n = 40_000
    hashes = node_hash_array([nid(i) for i in range(n)])
    s = Synthesis()
    s.add_columns(
        np.concatenate([hashes, hashes[:100]]),
        (np.zeros(n + 100, dtype=np.int64), ["a"]),
        np.ones(n + 100, dtype=np.int64),
        np.zeros(n + 100),
        np.ones(n + 100),
        np.ones(n + 100, dtype=np.int64),
        "t",
    )
    r = s.extract(ALL)
    assert abs(r["n_nodes"] - n) / n < 0.05
    assert abs(r["approaches"][0]["n_nodes"] - n) / n < 0.1
    assert len(state_of(s).node_hashes) == NODE_SKETCH_K  # bounded
    # the per-packet path (lazy pruning) and the batched path keep the same sketch
    t = Synthesis(node_k=512)
    for h in hashes[:5000].tolist():
        t.add_hashed(h, "a", RESOLVED, 0.0, 1.0, 1, "t")
    u = Synthesis(node_k=512)
    u.add_columns(
        hashes[:5000],
        ["a"] * 5000,
        np.ones(5000, dtype=np.int64),
        np.zeros(5000),
        np.ones(5000),
        np.ones(5000, dtype=np.int64),
        "t",
    )
    assert t.n_nodes == u.n_nodes
    assert abs(t.n_nodes - 5000) / 5000 < 0.15
    assert state_of(t).node_hashes == np.sort(hashes[:5000])[:512].tolist()


def test_approach_cap_is_deterministic_under_any_merge_order():
    cap = 4
    approaches = [f"ap{i}" for i in range(20)]
    expected = sorted(approaches, key=lambda a: (approach_hash(a), a))[:cap]
    packets = [
        (i % 11, approaches[(i * 7) % 20], 1 + i % 4, float(i % 5), 0.5, i, "t") for i in range(400)
    ]
    one = fold(packets, Synthesis(max_approaches=cap))
    assert one.tracked_approaches == sorted(expected)
    for seed in range(5):
        merged = split_fold_merge(
            packets,
            [seed * 37, seed * 91, 250 + seed],
            [seed % 2 == 0, True, False],
            seed,
            max_approaches=cap,
        )
        assert merged.tracked_approaches == sorted(expected)
        assert_close(merged.extract(ALL), one.extract(ALL))
    # untracked approaches still count at address level
    r = one.extract(ALL)
    assert r["n_packets"] == 400
    assert sum(a["n_packets"] for a in r["approaches"]) == 400 * cap // 20
    assert MAX_TRACKED_APPROACHES == 256
    # decoding with a smaller cap keeps the same deterministic choice
    back = Synthesis.from_bytes(one.to_bytes(), max_approaches=2)
    assert back.tracked_approaches == sorted(expected[:2])


# ------------------------------------------------------------------- fast paths = reference
# Sketches switch between sets, tuples and arrays, and merges between Python sets and numpy;
# decoding keeps canonical sketches as they are: none of it may show in a result or encoding.


def reference_bytes(s: Synthesis) -> bytes:
    """The state encoded from first principles: every sketch's K smallest hashes, sorted."""
    st_ = state_pb2.SynthesisState(
        encoding_version=1,
        template_id=s.template_id or "",
        n_packets=s.n_packets,
        total_weight=s.total_weight,
        mean_delta=s.mean_delta,
        m2_delta=s.m2_delta,
        success_sum=s.success_sum,
        failure_sum=s.failure_sum,
        outcome_counts=s.outcome_counts,
        node_hashes=sorted(map(int, s._nodes))[: s.node_k],
    )
    if s.n_packets:
        st_.first_event_ms = s.first_event_ms
        st_.last_event_ms = s.last_event_ms
    for aid in sorted(s._approaches):
        a = s._approaches[aid]
        st_.approaches.add(
            approach_id=aid,
            n_packets=a.n,
            total_weight=a.tw,
            weighted_delta_sum=a.wd,
            success_sum=a.ss,
            failure_sum=a.fs,
            node_hashes=sorted(map(int, a.nodes))[: s.approach_node_k],
        )
    return st_.SerializeToString(deterministic=True)


def protobuf_decoded(data, **caps) -> Synthesis:
    """``from_bytes`` through protobuf's parser only (the fallback for non-canonical input)."""
    return Synthesis(**caps)._decode_message(data)


@contextlib.contextmanager
def sketch_thresholds(tuple_max: int, set_merge_max: int):
    """Force the small (tuple / set) or large (array / numpy) sketch paths."""
    saved = synthesis._TUPLE_MAX, synthesis._SET_MERGE_MAX
    synthesis._TUPLE_MAX, synthesis._SET_MERGE_MAX = tuple_max, set_merge_max
    try:
        yield
    finally:
        synthesis._TUPLE_MAX, synthesis._SET_MERGE_MAX = saved


THRESHOLDS = [(0, 0), (64, 128), (10**9, 10**9), (2, 10**9), (10**9, 0)]


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
            assert data == reference_bytes(merged)
            assert Synthesis.from_bytes(data, **caps).to_bytes() == data
            results.append((data, merged.extract(ALL)))
    one = fold(packets, Synthesis(**caps))
    for data, record in results:
        # the same partials merged in the same order: identical up to representation
        assert data == results[0][0]
        assert record == results[0][1]
        assert_close(record, one.extract(ALL))
        assert state_of_bytes(data).node_hashes == state_of(one).node_hashes


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


def assert_same_state(a: Synthesis, b: Synthesis):
    assert a.to_bytes() == b.to_bytes()
    assert (a.n_packets, a.first_event_ms, a.last_event_ms, a.template_id) == (
        b.n_packets,
        b.first_event_ms,
        b.last_event_ms,
        b.template_id,
    )
    assert a.tracked_approaches == b.tracked_approaches
    assert a.n_nodes == b.n_nodes
    assert repr(a.extract(ALL)) == repr(b.extract(ALL))  # repr: nan-safe


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=canonical_states(), thresholds=st.sampled_from(THRESHOLDS))
def test_canonical_encodings_round_trip_byte_for_byte(data, thresholds):
    with sketch_thresholds(*thresholds):
        s = Synthesis.from_bytes(data)
        assert s.to_bytes() == data
        assert reference_bytes(s) == data
        assert_same_state(s, protobuf_decoded(data))
        assert s.copy().to_bytes() == data
        # (merging is not an identity for every encodable state: zero weight drops M2)
        assert_same_state(Synthesis().merge(s), Synthesis().merge(protobuf_decoded(data)))
        assert pickle.loads(pickle.dumps(s)).to_bytes() == data


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = [data[:i] for i in range(0, len(data), max(1, len(data) // 20))]
    for _ in range(30):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            if b:
                b[rng.randrange(len(b))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        out.append(bytes(b))
    return out


def test_edge_values_encode_like_protobuf():
    s = fold([(i, f"ap{i % 3}", 1 + i % 4, i / 3, (i % 5) / 4, 1000 + i, "t") for i in range(60)])
    s.add(nid(1), "x" * 300, RESOLVED, 1.0, 1.0, 5, "t")  # a record longer than 127 bytes
    s.add(nid(2), "", OPEN, -0.0, 0.0, 6, "t")  # the empty id is not written
    for i in range(200):  # 16+ hashes: the general record layout
        s.add_hashed(node_hash(nid(1000 + i)), "ap1", OPEN, 0.0, 0.0, 7, "t")
    s.total_weight = -0.0  # written (only +0.0 is the default)
    s.mean_delta = float("nan")
    s.m2_delta = float("inf")
    s.success_sum = 0.0
    s.failure_sum = 5e-324
    s.outcome_counts = [0, 2**64 - 1, 128, 0, 1]
    s.first_event_ms = np.int64(-(2**63))  # numpy integers are accepted, as protobuf did
    s.last_event_ms = 0
    s.template_id = "é" * 200
    a = s._approaches["ap0"]
    a.n, a.tw, a.wd, a.ss, a.fs = 2**40, -0.0, 0.0, float("nan"), 0.0
    data = s.to_bytes()
    assert data == reference_bytes(s)
    back = Synthesis.from_bytes(data)
    assert back.to_bytes() == data
    assert_same_state(back, protobuf_decoded(data))
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


class OldPickle:
    def __init__(self, s: Synthesis):
        self.s = s

    def __reduce__(self):
        return (Synthesis.from_bytes, (self.s.to_bytes(), 4096, 1024, 256))


def reference_rank_round(x: float) -> float:
    if x == 0.0 or not math.isfinite(x):
        return x
    return round(x, 11 - math.floor(math.log10(abs(x))))


def test_rank_round_is_the_correctly_rounded_12_digits():
    rng = random.Random(7)
    xs = [
        0.1,
        0.5,
        1.0,
        1 / 3,
        2 / 3,
        1e-300,
        5e-324,
        2.2250738585072014e-308,
        1.7976931348623157e308,
    ]
    for j in range(-323, 309):
        p = float(f"1e{j}")
        xs += [p, math.nextafter(p, 0.0), math.nextafter(p, math.inf), p * (1 - 1e-13)]
        xs += [p * (1 + 1e-13), p * 9.9999999999995, p * 1.00000000000005]
    xs += [rng.uniform(-1, 1) * 10 ** rng.randint(-320, 307) for _ in range(20000)]
    xs += [(1 + rng.random() * 40) / (2 + rng.random() * 80) for _ in range(5000)]
    xs += [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(20000)]
    for x in xs:
        for v in (x, -x):
            if math.isnan(v):
                assert math.isnan(synthesis._rank_round(v))
                continue
            got, want = synthesis._rank_round(v), reference_rank_round(v)
            assert got == want and math.copysign(1, got) == math.copysign(1, want), v
    assert synthesis._rank_round(math.inf) == math.inf
    assert math.isnan(synthesis._rank_round(math.nan))
