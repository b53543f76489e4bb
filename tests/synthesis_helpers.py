"""Shared helpers of the synthesis tests (test_synthesis.py, test_synthesis_encoding.py):
packets as tuples, folding them, and comparing records."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random

import numpy as np
from hypothesis import strategies as st

from qis_beam.proto import state_pb2
from qis_beam.synthesis import Synthesis, SynthesisParams, node_hash_array
from qis_beam.synthesis import sketch as sketch_module

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


def tracked(s: Synthesis) -> list[str]:
    """The approaches ``s`` keeps statistics for (every tracked one has a packet)."""
    return sorted(a["approach_id"] for a in s.extract(ALL)["approaches"])


def state_of(s: Synthesis) -> state_pb2.SynthesisState:
    st_ = state_pb2.SynthesisState()
    st_.ParseFromString(s.to_bytes())
    return st_


def same_state(a: Synthesis, b: Synthesis) -> bool:
    """Equal encodings up to float rounding of the sums (integers and hashes exactly)."""
    x, y = state_of(a), state_of(b)
    assert x.node_hashes == y.node_hashes and x.outcome_counts == y.outcome_counts
    assert [p.approach_id for p in x.approaches] == [p.approach_id for p in y.approaches]
    for p, q in zip(x.approaches, y.approaches, strict=True):
        assert p.node_hashes == q.node_hashes and p.n_packets == q.n_packets
    return True


@contextlib.contextmanager
def sketch_thresholds(tuple_max: int, set_merge_max: int):
    """Force the small (tuple / set) or large (array / numpy) sketch internals."""
    saved = sketch_module._TUPLE_MAX, sketch_module._SET_MERGE_MAX
    sketch_module._TUPLE_MAX, sketch_module._SET_MERGE_MAX = tuple_max, set_merge_max
    try:
        yield
    finally:
        sketch_module._TUPLE_MAX, sketch_module._SET_MERGE_MAX = saved


THRESHOLDS = [(0, 0), (64, 128), (10**9, 10**9), (2, 10**9), (10**9, 0)]
