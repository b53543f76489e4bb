"""Columnar fast path: fold a batch of many addresses' packets at once with numpy grouping.

Per-packet work is numpy only (sorts and weighted bincounts); Python loops run once per group
and once per (group, approach) pair. Results equal folding each packet with
:meth:`Synthesis.add <qis_beam.synthesis.Synthesis.add>`, within float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Sequence
from typing import Any

import numpy as np

from qis_beam.synthesis.accumulator import (
    APPROACH_NODE_SKETCH_K,
    I64_MAX,
    I64_MIN,
    MAX_TRACKED_APPROACHES,
    NODE_SKETCH_K,
    Synthesis,
)
from qis_beam.synthesis.approach import ApproachStats
from qis_beam.synthesis.hashing import approach_hash
from qis_beam.synthesis.sketch import DistinctSketch, sorted_unique
from qis_beam.wire import SCORE_BY_TYPE

# Per outcome type: the success score (0 where there is none) and whether there is one.
_SCORE = np.array([0.0 if s is None else s for s in SCORE_BY_TYPE])
_SCORED = np.array([s is not None for s in SCORE_BY_TYPE])
_N_TYPES = len(SCORE_BY_TYPE)


@dataclasses.dataclass(frozen=True)
class Columns:
    """One entry per packet in every column (``template_ids`` may be one string for all)."""

    template_ids: Sequence[str] | str
    # uint64 (see node_hash_array), or (distinct hashes ascending, index of each packet's)
    node_hashes: np.ndarray | tuple[np.ndarray, np.ndarray]
    approach_codes: np.ndarray  # int, indexes approach_vocab
    approach_vocab: Sequence[str]
    outcome_types: np.ndarray
    deltas: np.ndarray
    confidences: np.ndarray
    event_times_ms: np.ndarray


def synthesize_columns(
    address_keys: Sequence[Any] | np.ndarray | tuple[np.ndarray, Sequence[Any]],
    template_ids: Sequence[str] | np.ndarray | str,
    node_hashes: np.ndarray,
    approach_ids: Sequence[str] | np.ndarray | tuple[np.ndarray, Sequence[str]],
    outcome_types: np.ndarray,
    deltas: np.ndarray,
    confidences: np.ndarray,
    event_times_ms: np.ndarray,
    *,
    node_k: int = NODE_SKETCH_K,
    approach_node_k: int = APPROACH_NODE_SKETCH_K,
    max_approaches: int = MAX_TRACKED_APPROACHES,
) -> dict[Any, Synthesis]:
    """Fold a columnar batch of packets of many addresses: ``{address_key: Synthesis}``.

    One entry per packet in every column; ``template_ids`` may also be a single string.
    ``address_keys`` and ``approach_ids`` are one value per packet or a ``(codes, vocabulary)``
    pair (see :meth:`Synthesis.add_columns`). Node hashes come from :func:`node_hash_array`,
    or already coded as ``(np.unique(hashes), index of each packet's)``.
    """
    groups, addresses = factorize(address_keys)
    if not addresses:
        return {}
    codes, vocab = factorize(approach_ids)
    if isinstance(template_ids, np.ndarray):
        template_ids = template_ids.tolist()
    columns = Columns(
        template_ids=template_ids if isinstance(template_ids, str) else list(template_ids),
        node_hashes=node_hashes,
        approach_codes=codes,
        approach_vocab=vocab,
        outcome_types=outcome_types,
        deltas=deltas,
        confidences=confidences,
        event_times_ms=event_times_ms,
    )
    parts = fold_groups(groups, len(addresses), columns, (node_k, approach_node_k, max_approaches))
    return dict(zip(addresses, parts, strict=True))


def factorize(values: Any) -> tuple[np.ndarray, list]:
    """(codes, vocabulary) for a sequence of hashable values, or pass a (codes, vocab) through."""
    if isinstance(values, tuple) and len(values) == 2 and isinstance(values[0], np.ndarray | list):
        return np.asarray(values[0], dtype=np.int64), list(values[1])
    if isinstance(values, np.ndarray):
        values = values.tolist()
    index: dict = {}
    setdefault = index.setdefault
    codes = np.fromiter(
        (setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values)
    )
    return codes, list(index)


def fold_groups(
    groups: np.ndarray, n_groups: int, columns: Columns, caps: tuple[int, int, int]
) -> list[Synthesis]:
    """One fresh :class:`Synthesis` (with ``caps``) per group code 0..n_groups-1, every group
    non-empty; ``groups`` holds each packet's code."""
    with gc_paused():
        return _fold_groups(groups, n_groups, columns, caps)


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside, for code that builds many objects, none in a
    cycle: the collector would only walk them again and again (a fold builds a few per
    (group, approach) pair: a third of its time)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _fold_groups(
    groups: np.ndarray, n_groups: int, columns: Columns, caps: tuple[int, int, int]
) -> list[Synthesis]:
    node_k, approach_node_k, max_approaches = caps
    n = len(groups)
    h = columns.node_hashes
    if isinstance(h, tuple):  # already coded: (distinct hashes ascending, code of each packet)
        uh, node_code = h
        h = node_code
    else:
        h = np.asarray(h, dtype=np.uint64)
        uh, node_code = np.unique(h, return_inverse=True)
        node_code = node_code.reshape(-1)
    ot = np.asarray(columns.outcome_types, dtype=np.int64)
    d = np.asarray(columns.deltas, dtype=np.float64)
    w = np.asarray(columns.confidences, dtype=np.float64)
    t = np.asarray(columns.event_times_ms, dtype=np.int64)
    approach_codes = columns.approach_codes
    if not (len(h) == len(ot) == len(d) == len(w) == len(t) == len(approach_codes) == n):
        raise ValueError("all columns must have the same length")
    G = n_groups
    if n == 0:
        return []
    if ot.min() < 1 or ot.max() >= _N_TYPES:
        raise ValueError("invalid outcome_type in batch")
    if not (w >= 0.0).all():
        raise ValueError("confidence must be >= 0")

    counts = np.bincount(groups, minlength=G)
    tw = np.bincount(groups, weights=w, minlength=G)
    wd = np.bincount(groups, weights=w * d, minlength=G)
    mean = np.divide(wd, tw, out=np.zeros(G), where=tw > 0)
    # Two-pass M2 around each group's own mean: stable, and merges exactly by Chan's formula.
    m2 = np.bincount(groups, weights=w * (d - mean[groups]) ** 2, minlength=G)
    ws = w * _SCORE[ot]
    wf = np.where(_SCORED[ot], w - ws, 0.0)
    ss = np.bincount(groups, weights=ws, minlength=G)
    fs = np.bincount(groups, weights=wf, minlength=G)
    oc = np.bincount(groups * _N_TYPES + ot, minlength=G * _N_TYPES).reshape(G, _N_TYPES)
    first = np.full(G, I64_MAX, dtype=np.int64)
    np.minimum.at(first, groups, t)
    last = np.full(G, I64_MIN, dtype=np.int64)
    np.maximum.at(last, groups, t)

    # Distinct nodes: code the hashes densely in hash order, so that sorting the single int64
    # key group*U + code sorts by (group, hash) and deduplicates both at once.
    U = len(uh)
    gkey = _sorted_distinct(groups * U + node_code, G * U)
    g_nodes = DistinctSketch.split(
        uh[gkey % U], np.searchsorted(gkey // U, np.arange(G + 1)), node_k
    )

    template_ids = columns.template_ids
    if isinstance(template_ids, str):
        group_templates: list[str | None] = [template_ids or None] * G
    else:
        group_templates = _min_template_per_group(template_ids, groups, G)

    out = []
    counts_l, tw_l, mean_l, m2_l = counts.tolist(), tw.tolist(), mean.tolist(), m2.tolist()
    ss_l, fs_l, oc_l = ss.tolist(), fs.tolist(), oc.tolist()
    first_l, last_l = first.tolist(), last.tolist()
    for g in range(G):
        s = Synthesis(node_k, approach_node_k, max_approaches)
        s.n_packets = counts_l[g]
        s.total_weight = tw_l[g]
        s.mean_delta = mean_l[g]
        s.m2_delta = m2_l[g]
        s.success_sum = ss_l[g]
        s.failure_sum = fs_l[g]
        s.outcome_counts = oc_l[g]
        s.first_event_ms = first_l[g]
        s.last_event_ms = last_l[g]
        s.template_id = group_templates[g]
        s._nodes = g_nodes[g]
        out.append(s)
    if max_approaches == 0:
        return out

    # Approaches: the same per (group, approach) pair.
    vocab = columns.approach_vocab
    V = max(len(vocab), 1)
    upair, pinv = dense_codes(groups * V + approach_codes, G * V)
    P = len(upair)
    p_n = np.bincount(pinv, minlength=P).tolist()
    p_tw = np.bincount(pinv, weights=w, minlength=P).tolist()
    p_wd = np.bincount(pinv, weights=w * d, minlength=P).tolist()
    p_ss = np.bincount(pinv, weights=ws, minlength=P).tolist()
    p_fs = np.bincount(pinv, weights=wf, minlength=P).tolist()
    p_group = (upair // V).tolist()
    p_code = (upair % V).tolist()
    pkey = _sorted_distinct(pinv * U + node_code, P * U)
    p_nodes = DistinctSketch.split(
        uh[pkey % U], np.searchsorted(pkey // U, np.arange(P + 1)), approach_node_k
    )
    keys = [(approach_hash(a), a) for a in vocab]
    tables = [s._approaches for s in out]
    for p, code in enumerate(p_code):
        aid = vocab[code]
        tables[p_group[p]][aid] = ApproachStats(
            aid, p_nodes[p], keys[code], p_n[p], p_tw[p], p_wd[p], p_ss[p], p_fs[p]
        )
    for s in out:
        if len(s._approaches) > max_approaches:
            keep = sorted(s._approaches.values(), key=lambda a: a.key)[:max_approaches]
            s._approaches = {a.approach_id: a for a in keep}
    return out


def dense_codes(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each x among them) for ints x in [0, size)."""
    if size <= 4 * len(x) + 4096:
        # A presence table beats a binary search per element when the key space is small.
        present = np.bincount(x, minlength=size) > 0
        return np.flatnonzero(present), (np.cumsum(present) - 1)[x]
    ux = sorted_unique(x)
    return ux, np.searchsorted(ux, x)


def _sorted_distinct(x: np.ndarray, size: int) -> np.ndarray:
    """The distinct values of ints x in [0, size), ascending."""
    if size <= 4 * len(x) + 4096:
        present = np.zeros(size, dtype=bool)
        present[x] = True
        return np.flatnonzero(present)
    return sorted_unique(x)


def _min_template_per_group(
    template_ids: Sequence[str], groups: np.ndarray, n_groups: int
) -> list[str | None]:
    codes, vocab = factorize(template_ids)
    # Rank the vocabulary lexicographically; empty ids (unset) rank last and map back to None.
    ranked = sorted(range(len(vocab)), key=lambda i: (not vocab[i], vocab[i]))
    rank_of = np.empty(len(vocab), dtype=np.int64)
    rank_of[ranked] = np.arange(len(vocab))
    best = np.full(n_groups, len(vocab) - 1, dtype=np.int64)
    np.minimum.at(best, groups, rank_of[codes])
    return [vocab[ranked[r]] or None for r in best.tolist()]
