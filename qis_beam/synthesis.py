"""Per-address synthesis of outcome packets (spec section 5): the math, with no Beam in it.

One :class:`Synthesis` is a mergeable accumulator for one address over one window (or all
time). The same object backs the Beam ``CombineFn`` (``add`` / ``merge`` / ``extract``), the
stateful all-time DoFn (which stores ``to_bytes()``, an explicit, versioned
``qis.v1.SynthesisState``, never a pickle) and the benchmark's tight-loop reference.
:func:`synthesize_columns` folds a columnar batch of many addresses at once with numpy grouping;
it is the fast path for file-level batches.

Mergeability. Every statistic is a commutative monoid: counts and weighted sums add, the
weighted mean and its ``M2`` combine with Chan et al.'s parallel formula, event times take
min/max, the template id takes the lexicographic minimum, and both bounded sets below are
"bottom-k by hash", whose merge is the bottom-k of the union. Results therefore agree (within
float rounding) whatever the bundling, split or merge order. Ranking keys are rounded to 12
significant digits before sorting, so approaches tied mathematically rank the same whatever
order their sums were accumulated in.

Bounded size (the accumulator does not grow with the number of packets):

* **Distinct nodes** are a bottom-k sketch of 64-bit node hashes (the first 8 bytes of
  ``node_id``, itself a SHA-256 prefix, so uniform). Per address it keeps the
  ``NODE_SKETCH_K`` = 4096 smallest distinct hashes; per approach ``APPROACH_NODE_SKETCH_K`` =
  1024. ``n_nodes`` is exact while fewer than K distinct nodes were seen; from K on it is the
  estimate ``round((K-1) * 2**64 / h_K)``, ``h_K`` being the K-th smallest hash (relative
  standard error about ``1/sqrt(K)``: 1.6% per address, 3.1% per approach). Worst case per
  address: 32 KiB + 256 x 8 KiB of hashes.
* **Approaches**: at most ``MAX_TRACKED_APPROACHES`` = 256 per address are tracked, chosen as
  those with the smallest ``blake2b-64(approach_id)`` (ties, vanishingly rare, by approach_id).
  That set is the bottom-256 of all approach ids ever seen, so it is identical whatever the
  merge order, and a tracked approach's statistics are always complete (it cannot have been
  evicted from any part). Packets of untracked approaches still count in every address-level
  statistic.

Internally a sketch is a collection of hashes plus a threshold ``thr``: it holds *every*
distinct hash seen that is ``<= thr`` (``thr = 2**64`` means "all of them") and, once ``thr``
is finite, at least K of them. An accumulator being added to owns a mutable ``set``, pruned
back to K lazily when it reaches 2K, so ``add`` is an O(1) set insert. Decoded, merged and
batch-built sketches are immutable, sorted and at most K long, so they are shared rather than
copied: a ``tuple`` while small (cheap to build, merge through a set and encode), else a uint64
array (vectorised merges and encodings; batches hand out views into one array). Outputs and
encodings use the K smallest, so which representation holds a sketch never changes a result.

Encoding. ``to_bytes``/``from_bytes`` go through ``qis.v1.SynthesisState`` (protobuf's
deterministic serialisation), so other implementations read the same bytes. A decoded sketch
that is already sorted and distinct (the canonical encoding) is kept as it is, not re-sorted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qis_beam.proto import state_pb2

OUTCOME_NAMES = {1: "RESOLVED", 2: "PARTIAL", 3: "CONTRADICTED", 4: "OPEN"}
NODE_SKETCH_K = 4096  # distinct nodes counted exactly up to this many per address
APPROACH_NODE_SKETCH_K = 1024  # ... and up to this many per approach
MAX_TRACKED_APPROACHES = 256  # per address
ENCODING_VERSION = 1

_OPEN = 4
_INF = 1 << 64  # sketch threshold meaning "complete": above every uint64 hash
_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
# Indexed by outcome type; None for OPEN so the hot path tests one thing.
_SCORE = (None, 1.0, 0.5, 0.0, None)
_VALID_OUTCOMES = frozenset(OUTCOME_NAMES)


def node_hash(node_id: bytes) -> int:
    """uint64 of ``node_id[:8]`` big-endian; node ids are SHA-256 prefixes, hence uniform."""
    return int.from_bytes(node_id[:8], "big")


def node_hash_array(node_ids: Sequence[bytes]) -> np.ndarray:
    """Vectorised :func:`node_hash` (uint64 array)."""
    n = len(node_ids)
    if n and min(map(len, node_ids)) >= 8:
        # "S8" keeps exactly the first 8 bytes of each id: no per-id Python work.
        return np.array(node_ids, dtype="S8").view(">u8").astype(np.uint64)
    return np.fromiter((node_hash(x) for x in node_ids), dtype=np.uint64, count=n)


@functools.lru_cache(maxsize=1 << 16)
def approach_hash(approach_id: str) -> int:
    """Stable 64-bit hash choosing the tracked approaches (never Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(approach_id.encode(), digest_size=8).digest(), "big")


@dataclasses.dataclass(frozen=True)
class SynthesisParams:
    min_support: int = 3
    top_k: int = 10
    min_nodes: int = 1


DEFAULT_PARAMS = SynthesisParams()

# --------------------------------------------------------------------------------------------
# bottom-k sketch helpers. A sketch is (hashes, thr), see the module docstring. ``hashes`` is
# either a set of Python ints (mutable, owned by one accumulator: the per-packet path), or an
# immutable, sorted, distinct, at most k long sequence that is shared without copying: a tuple
# of ints (decoded or merged, up to ``_TUPLE_MAX`` hashes) or a uint64 array that is never
# written to (larger ones, and all of a batch's, which are views into one array until shared).

Hashes = set[int] | tuple[int, ...] | np.ndarray
_EMPTY: tuple[int, ...] = ()
# Immutable sketches up to this many hashes are tuples (Python ints beat numpy's per-call cost).
_TUPLE_MAX = 64
# A merge into an immutable sketch goes through a Python set up to this many hashes in all,
# through a vectorised sort of both sides beyond.
_SET_MERGE_MAX = 128
_lt = operator.lt


def _prune(hashes: set[int], k: int) -> tuple[set[int], int]:
    kept = sorted(hashes)[:k]
    return set(kept), kept[-1]


def _as_ints(hashes: Hashes) -> Iterable[int]:
    return hashes.tolist() if type(hashes) is np.ndarray else hashes


def _as_array(hashes: Hashes) -> np.ndarray:
    if type(hashes) is np.ndarray:
        return hashes
    if type(hashes) is tuple:
        return np.array(hashes, dtype=np.uint64)
    return np.fromiter(hashes, dtype=np.uint64, count=len(hashes))


def _freeze(ordered: np.ndarray) -> tuple[int, ...] | np.ndarray:
    """An owned, sorted, distinct uint64 array as an immutable sketch (a tuple while small)."""
    return tuple(ordered.tolist()) if len(ordered) <= _TUPLE_MAX else ordered


def _shared(hashes: Hashes) -> Hashes:
    """``hashes`` for a second owner: sets are copied, immutable sketches shared."""
    if type(hashes) is set:
        return set(hashes)
    if type(hashes) is np.ndarray and hashes.base is not None:
        # A view into a whole batch's array would keep that array alive as long as the sketch.
        return tuple(hashes.tolist()) if len(hashes) <= _TUPLE_MAX else hashes.copy()
    return hashes


def _merge_sketch(a: Hashes, a_thr: int, b: Hashes, b_thr: int, k: int) -> tuple[Hashes, int]:
    """Bottom-k of the union. Only ``a`` may be modified, and only if it is a set."""
    if len(b) == 0:
        return a, a_thr
    if len(a) == 0:
        return _shared(b), b_thr
    thr = a_thr if a_thr < b_thr else b_thr
    if type(a) is not set:
        if len(a) + len(b) > _SET_MERGE_MAX:
            # Two sorted runs: a stable (merging) sort, then drop the duplicates.
            u = np.concatenate((_as_array(a), _as_array(b)))
            u.sort(kind="stable")
            u = _dedupe_sorted(u)
            if thr != _INF:
                u = u[u <= np.uint64(thr)]
            if len(u) > k:
                u = u[:k].copy()
                thr = int(u[-1])
            return _freeze(u), thr
        # A fresh set this accumulator owns from now on.
        a = set(a.tolist() if type(a) is np.ndarray else a)
    if type(b) is np.ndarray:
        b = b.tolist()
    if thr == _INF:
        a.update(b)
    else:
        # Each side is complete only below its own threshold: so is the union, below min.
        if a_thr > thr:
            a = {x for x in a if x <= thr}
        a.update([x for x in b if x <= thr])
    if len(a) >= 2 * k:
        return _prune(a, k)
    return a, thr


def _split_sketches(sorted_hashes: np.ndarray, bounds: np.ndarray, k: int) -> tuple[list, list]:
    """Sketches of consecutive runs ``sorted_hashes[bounds[i]:bounds[i+1]]`` (each run sorted and
    distinct): views, not copies (see ``_shared``), and their thresholds."""
    starts = bounds[:-1]
    ends = bounds[1:]
    cut = (ends - starts) > k
    ends = np.where(cut, starts + k, ends)
    thr = [_INF] * len(starts)
    for i in np.flatnonzero(cut).tolist():
        thr[i] = int(sorted_hashes[starts[i] + k - 1])
    views = [sorted_hashes[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return views, thr


def _sketch_count(hashes: Hashes, k: int) -> int:
    if len(hashes) < k:
        return len(hashes)
    kth = sorted(hashes)[k - 1] if type(hashes) is set else int(hashes[k - 1])
    return round((k - 1) * _INF / kth)


def _smallest(hashes: Hashes, k: int) -> list[int]:
    """The k smallest hashes, ascending: a sketch's encoding."""
    if type(hashes) is set:
        return sorted(hashes)[:k]
    return hashes[:k].tolist() if type(hashes) is np.ndarray else list(hashes[:k])


def _ascending(t: tuple[int, ...]) -> bool:
    """Strictly increasing (so sorted and distinct)."""
    m = len(t)
    if m < 3:
        return m < 2 or t[0] < t[1]
    if m == 3:
        return t[0] < t[1] < t[2]
    return all(map(_lt, t, t[1:]))


def _sketch_of(hashes: tuple[int, ...], k: int) -> tuple[Hashes, int]:
    """A decoded sketch. A stored sketch of K hashes may have dropped larger ones: it is
    complete up to its max. Sorted, distinct input (the canonical encoding) is kept as is."""
    if not _ascending(hashes):
        hashes = tuple(sorted(set(hashes)))
    if len(hashes) > _TUPLE_MAX:
        return _sketch_of_array(np.array(hashes, dtype=np.uint64), k)
    if len(hashes) >= k:
        hashes = hashes[:k]
        return hashes, hashes[-1]
    return hashes, _INF


def _sketch_of_array(hashes: np.ndarray, k: int) -> tuple[Hashes, int]:
    """:func:`_sketch_of` for an owned uint64 array."""
    if len(hashes) > 1 and not (hashes[1:] > hashes[:-1]).all():
        hashes = _sorted_unique(hashes)
    if len(hashes) >= k:
        hashes = hashes[:k].copy()
        return _freeze(hashes), int(hashes[-1])
    return _freeze(hashes), _INF


# --------------------------------------------------------------------------------------------


class _Approach:
    """Per-approach sums. The delta is kept as a plain weighted sum (only its mean is reported)."""

    __slots__ = ("approach_id", "_key", "n", "tw", "wd", "ss", "fs", "nodes", "thr")

    def __init__(
        self,
        approach_id: str,
        key: tuple[int, str] | None = None,
        n: int = 0,
        tw: float = 0.0,
        wd: float = 0.0,
        ss: float = 0.0,
        fs: float = 0.0,
        nodes: Hashes = _EMPTY,
        thr: int = _INF,
    ) -> None:
        self.approach_id = approach_id
        self._key = key  # computed on first use: only needed when approaches are capped
        self.n = n
        self.tw = tw
        self.wd = wd
        self.ss = ss
        self.fs = fs
        self.nodes = nodes
        self.thr = thr

    @property
    def key(self) -> tuple[int, str]:
        """Tracking order: the smallest ``(approach_hash, approach_id)`` are tracked."""
        key = self._key
        if key is None:
            key = self._key = (approach_hash(self.approach_id), self.approach_id)
        return key

    def copy(self) -> _Approach:
        return _Approach(
            self.approach_id,
            self._key,
            self.n,
            self.tw,
            self.wd,
            self.ss,
            self.fs,
            _shared(self.nodes),
            self.thr,
        )

    def merge(self, other: _Approach, k: int) -> None:
        self.n += other.n
        self.tw += other.tw
        self.wd += other.wd
        self.ss += other.ss
        self.fs += other.fs
        self.nodes, self.thr = _merge_sketch(self.nodes, self.thr, other.nodes, other.thr, k)


class Synthesis:
    """Mergeable accumulator for one address (and one window, or all time).

    ``node_k``, ``approach_node_k`` and ``max_approaches`` override the caps (tests use small
    ones); they are not part of the encoded state, so decode with the same values.
    """

    __slots__ = (
        "n_packets",
        "total_weight",
        "mean_delta",
        "m2_delta",
        "success_sum",
        "failure_sum",
        "outcome_counts",
        "first_event_ms",
        "last_event_ms",
        "template_id",
        "_nodes",
        "_nodes_thr",
        "_approaches",
        "_approach_max",
        "node_k",
        "approach_node_k",
        "max_approaches",
    )

    def __init__(
        self,
        node_k: int = NODE_SKETCH_K,
        approach_node_k: int = APPROACH_NODE_SKETCH_K,
        max_approaches: int = MAX_TRACKED_APPROACHES,
    ) -> None:
        if node_k < 2 or approach_node_k < 2 or max_approaches < 0:
            raise ValueError("sketch sizes must be >= 2 and max_approaches >= 0")
        self.node_k = node_k
        self.approach_node_k = approach_node_k
        self.max_approaches = max_approaches
        self.n_packets = 0
        self.total_weight = 0.0
        self.mean_delta = 0.0  # weighted mean so far (0.0 while total_weight == 0)
        self.m2_delta = 0.0  # sum of w * (delta - mean)^2
        self.success_sum = 0.0
        self.failure_sum = 0.0
        self.outcome_counts = [0, 0, 0, 0, 0]  # indexed by outcome type 1..4
        self.first_event_ms = _I64_MAX
        self.last_event_ms = _I64_MIN
        self.template_id: str | None = None
        self._nodes: Hashes = _EMPTY
        self._nodes_thr = _INF
        self._approaches: dict[str, _Approach] = {}
        # Key of the largest tracked approach, cached while the approach table is full.
        self._approach_max: tuple[int, str] | None = None

    def _like(self) -> Synthesis:
        return Synthesis(self.node_k, self.approach_node_k, self.max_approaches)

    # ---------------------------------------------------------------------------- per packet

    def add(
        self,
        node_id: bytes,
        approach_id: str,
        outcome_type: int,
        delta: float,
        confidence: float,
        event_time_ms: int,
        template_id: str,
    ) -> None:
        """Fold one packet (the tight-loop path)."""
        self.add_hashed(
            int.from_bytes(node_id[:8], "big"),
            approach_id,
            outcome_type,
            delta,
            confidence,
            event_time_ms,
            template_id,
        )

    def add_hashed(
        self,
        h: int,
        approach_id: str,
        outcome_type: int,
        delta: float,
        confidence: float,
        event_time_ms: int,
        template_id: str,
    ) -> None:
        """:meth:`add` with the node already hashed by :func:`node_hash` (a Python int)."""
        if outcome_type not in _VALID_OUTCOMES:
            raise ValueError(f"invalid outcome_type {outcome_type!r}")
        w = float(confidence)
        if not w >= 0.0:  # also rejects NaN
            raise ValueError(f"confidence must be >= 0, got {confidence!r}")
        d = float(delta)
        self.n_packets += 1
        self.outcome_counts[outcome_type] += 1
        # Zero-weight packets count but move no weighted statistic (same as a Chan merge with 0).
        if w > 0.0:
            tw = self.total_weight + w
            dm = d - self.mean_delta
            mean = self.mean_delta + dm * w / tw
            self.m2_delta += w * dm * (d - mean)
            self.mean_delta = mean
            self.total_weight = tw
        s = _SCORE[outcome_type]
        if s is not None:
            self.success_sum += w * s
            self.failure_sum += w * (1.0 - s)
        if event_time_ms < self.first_event_ms:
            self.first_event_ms = event_time_ms
        if event_time_ms > self.last_event_ms:
            self.last_event_ms = event_time_ms
        if template_id:
            tid = self.template_id
            if tid is None or template_id < tid:
                self.template_id = template_id

        nodes = self._nodes
        if type(nodes) is not set:
            nodes = self._nodes = set(_as_ints(nodes))
        if h not in nodes and h < self._nodes_thr:
            nodes.add(h)
            if len(nodes) >= 2 * self.node_k:
                self._nodes, self._nodes_thr = _prune(nodes, self.node_k)

        a = self._approaches.get(approach_id)
        if a is None:
            a = self._track(approach_id)
            if a is None:
                return
        a.n += 1
        a.tw += w
        a.wd += w * d
        if s is not None:
            a.ss += w * s
            a.fs += w * (1.0 - s)
        nodes = a.nodes
        if type(nodes) is not set:
            nodes = a.nodes = set(_as_ints(nodes))
        if h not in nodes and h < a.thr:
            nodes.add(h)
            if len(nodes) >= 2 * self.approach_node_k:
                a.nodes, a.thr = _prune(nodes, self.approach_node_k)

    def _track(self, approach_id: str) -> _Approach | None:
        """Start tracking a new approach, or None if it is outside the bottom-k by hash."""
        approaches = self._approaches
        if len(approaches) < self.max_approaches:
            a = approaches[approach_id] = _Approach(approach_id)
            return a
        if self.max_approaches == 0:
            return None
        key = (approach_hash(approach_id), approach_id)
        top = self._approach_max
        if top is None:
            top = self._approach_max = max(a.key for a in approaches.values())
        if key >= top:
            return None
        del approaches[top[1]]
        a = approaches[approach_id] = _Approach(approach_id, key)
        self._approach_max = max(a.key for a in approaches.values())
        return a

    # ---------------------------------------------------------------------------- batched

    def add_columns(
        self,
        node_hashes: np.ndarray,
        approach_ids: Sequence[str] | np.ndarray | tuple[np.ndarray, Sequence[str]],
        outcome_types: np.ndarray,
        deltas: np.ndarray,
        confidences: np.ndarray,
        event_times_ms: np.ndarray,
        template_id: str,
    ) -> None:
        """Vectorised fold of many packets of this address.

        ``approach_ids`` is either one string per packet, or a ``(codes, vocabulary)`` pair where
        ``codes`` is an int array indexing ``vocabulary`` (cheaper when the caller already has it).
        """
        n = len(node_hashes)
        if n == 0:
            return
        codes, vocab = _factorize(approach_ids)
        (part,) = _fold_groups(
            np.zeros(n, dtype=np.int64),
            1,
            template_id,
            node_hashes,
            codes,
            vocab,
            outcome_types,
            deltas,
            confidences,
            event_times_ms,
            self.node_k,
            self.approach_node_k,
            self.max_approaches,
        )
        self._merge(part, copy=False)

    # ---------------------------------------------------------------------------- merging

    def copy(self) -> Synthesis:
        """An independent copy (immutable sketches are shared, everything mutable copied)."""
        c = Synthesis.__new__(Synthesis)
        c.node_k = self.node_k
        c.approach_node_k = self.approach_node_k
        c.max_approaches = self.max_approaches
        c.n_packets = self.n_packets
        c.total_weight = self.total_weight
        c.mean_delta = self.mean_delta
        c.m2_delta = self.m2_delta
        c.success_sum = self.success_sum
        c.failure_sum = self.failure_sum
        c.outcome_counts = self.outcome_counts[:]
        c.first_event_ms = self.first_event_ms
        c.last_event_ms = self.last_event_ms
        c.template_id = self.template_id
        c._nodes = _shared(self._nodes)
        c._nodes_thr = self._nodes_thr
        c._approaches = {aid: a.copy() for aid, a in self._approaches.items()}
        c._approach_max = self._approach_max
        return c

    def merge(self, other: Synthesis) -> Synthesis:
        """Fold ``other`` into this accumulator (in place) and return self."""
        return self._merge(other, copy=True)

    def _merge(self, other: Synthesis, copy: bool) -> Synthesis:
        if other is self:
            other, copy = self.copy(), False
        if other.n_packets == 0:
            return self
        self.n_packets += other.n_packets
        ta, tb = self.total_weight, other.total_weight
        tw = ta + tb
        if tb > 0.0:
            if ta > 0.0:
                # Chan et al.: exact combination of weighted mean and M2 of two parts.
                dm = other.mean_delta - self.mean_delta
                self.mean_delta += dm * tb / tw
                self.m2_delta += other.m2_delta + dm * dm * ta * tb / tw
            else:
                self.mean_delta = other.mean_delta
                self.m2_delta = other.m2_delta
            self.total_weight = tw
        self.success_sum += other.success_sum
        self.failure_sum += other.failure_sum
        self.outcome_counts = list(map(operator.add, self.outcome_counts, other.outcome_counts))
        if other.first_event_ms < self.first_event_ms:
            self.first_event_ms = other.first_event_ms
        if other.last_event_ms > self.last_event_ms:
            self.last_event_ms = other.last_event_ms
        if other.template_id and (self.template_id is None or other.template_id < self.template_id):
            self.template_id = other.template_id
        self._nodes, self._nodes_thr = _merge_sketch(
            self._nodes, self._nodes_thr, other._nodes, other._nodes_thr, self.node_k
        )

        mine = self._approaches
        k = self.approach_node_k
        for aid, oa in other._approaches.items():
            a = mine.get(aid)
            if a is None:
                mine[aid] = oa.copy() if copy else oa
            else:
                a.merge(oa, k)
        if len(mine) > self.max_approaches:
            # Bottom-k of the union: the same tracked set whatever the merge order.
            keep = sorted(mine.values(), key=lambda a: a.key)[: self.max_approaches]
            self._approaches = {a.approach_id: a for a in keep}
        self._approach_max = None
        return self

    @classmethod
    def merge_all(cls, syntheses: Iterable[Synthesis]) -> Synthesis:
        result: Synthesis | None = None
        for s in syntheses:
            if result is None:
                result = s._like()
            result._merge(s, copy=True)
        return result if result is not None else cls()

    # ---------------------------------------------------------------------------- output

    @property
    def n_nodes(self) -> int:
        return _sketch_count(self._nodes, self.node_k)

    @property
    def tracked_approaches(self) -> list[str]:
        return sorted(self._approaches)

    def extract(self, params: SynthesisParams = DEFAULT_PARAMS) -> dict[str, Any]:
        """The section-5 record (JSON-ready: only Python scalars, lists, dicts and None)."""
        n_nodes = self.n_nodes
        if n_nodes < params.min_nodes:
            return {"n_packets": self.n_packets, "n_nodes": n_nodes, "suppressed": True}
        tw = self.total_weight
        if tw > 0.0:
            mean: float | None = self.mean_delta
            var: float | None = max(self.m2_delta, 0.0) / tw
        else:
            mean = var = None
        alpha = 1.0 + self.success_sum
        beta = 1.0 + self.failure_sum

        # Sort rows (rank key, approach_id, ...): approach ids are distinct, so the order is
        # decided by the key and the id alone; only the reported rows are turned into dicts.
        # The keys are -_rank_round(...) inlined ("%" formats faster than format specs).
        ranked = []
        min_support = params.min_support
        for a in self._approaches.values():
            if a.n < min_support:
                continue
            a_tw = a.tw
            a_ss = a.ss
            a_succ = (1.0 + a_ss) / (2.0 + a_ss + a.fs)
            succ_key = -float("%.12g" % a_succ)  # noqa: UP031
            if a_tw > 0.0:
                a_mean: float | None = a.wd / a_tw
                mean_key = -float("%.12g" % a_mean)  # noqa: UP031
                ranked.append((succ_key, False, mean_key, a.approach_id, a, a_mean, a_succ))
            else:
                ranked.append((succ_key, True, 0.0, a.approach_id, a, None, a_succ))
        ranked.sort()
        k = self.approach_node_k
        approaches = [
            {
                "approach_id": aid,
                "n_packets": a.n,
                "n_nodes": _sketch_count(a.nodes, k),
                "total_weight": a.tw,
                "mean_delta": a_mean,
                "success_mean": a_succ,
            }
            for _, _, _, aid, a, a_mean, a_succ in ranked[: max(params.top_k, 0)]
        ]
        empty = self.n_packets == 0
        return {
            "n_packets": self.n_packets,
            "n_nodes": n_nodes,
            "synthesis_paths": n_nodes * (n_nodes - 1) // 2,
            "total_weight": tw,
            "mean_delta": mean,
            "delta_variance": var,
            "success_alpha": alpha,
            "success_beta": beta,
            "success_mean": alpha / (alpha + beta),
            "outcome_counts": {OUTCOME_NAMES[t]: self.outcome_counts[t] for t in (1, 2, 3, 4)},
            "approaches": approaches,
            "recommended_approach": approaches[0]["approach_id"] if approaches else None,
            "first_event_ms": None if empty else int(self.first_event_ms),
            "last_event_ms": None if empty else int(self.last_event_ms),
            "suppressed": False,
        }

    # ---------------------------------------------------------------------------- encoding

    def to_bytes(self) -> bytes:
        """``qis.v1.SynthesisState`` (encoding_version 1), canonical: same state, same bytes."""
        st = state_pb2.SynthesisState(
            encoding_version=ENCODING_VERSION,
            template_id=self.template_id or "",
            n_packets=self.n_packets,
            total_weight=self.total_weight,
            mean_delta=self.mean_delta,
            m2_delta=self.m2_delta,
            success_sum=self.success_sum,
            failure_sum=self.failure_sum,
            outcome_counts=self.outcome_counts,
            node_hashes=_smallest(self._nodes, self.node_k),
        )
        if self.n_packets:
            st.first_event_ms = self.first_event_ms
            st.last_event_ms = self.last_event_ms
        k = self.approach_node_k
        approaches = self._approaches
        st.approaches.extend(
            state_pb2.ApproachState(
                approach_id=aid,
                n_packets=a.n,
                total_weight=a.tw,
                weighted_delta_sum=a.wd,
                success_sum=a.ss,
                failure_sum=a.fs,
                node_hashes=_smallest(a.nodes, k),
            )
            for aid, a in sorted(approaches.items())
        )
        return st.SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        node_k: int = NODE_SKETCH_K,
        approach_node_k: int = APPROACH_NODE_SKETCH_K,
        max_approaches: int = MAX_TRACKED_APPROACHES,
    ) -> Synthesis:
        return cls(node_k, approach_node_k, max_approaches)._decode_message(data)

    def _decode_message(self, data: bytes) -> Synthesis:
        """Read a ``SynthesisState`` encoding into this fresh accumulator."""
        st = state_pb2.SynthesisState()
        try:
            st.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError is not a ValueError
            raise ValueError(f"undecodable SynthesisState: {e}") from e
        if st.encoding_version != ENCODING_VERSION:
            raise ValueError(f"unknown SynthesisState encoding_version {st.encoding_version}")
        self.n_packets = st.n_packets
        self.total_weight = st.total_weight
        self.mean_delta = st.mean_delta
        self.m2_delta = st.m2_delta
        self.success_sum = st.success_sum
        self.failure_sum = st.failure_sum
        counts = list(st.outcome_counts)[:5]
        self.outcome_counts = counts + [0] * (5 - len(counts))
        if self.n_packets:
            self.first_event_ms = st.first_event_ms
            self.last_event_ms = st.last_event_ms
        self.template_id = st.template_id or None
        self._nodes, self._nodes_thr = _sketch_of(tuple(st.node_hashes), self.node_k)
        approaches = []
        for ast in st.approaches:
            a = _Approach(ast.approach_id)
            a.n = ast.n_packets
            a.tw = ast.total_weight
            a.wd = ast.weighted_delta_sum
            a.ss = ast.success_sum
            a.fs = ast.failure_sum
            a.nodes, a.thr = _sketch_of(tuple(ast.node_hashes), self.approach_node_k)
            approaches.append(a)
        approaches.sort(key=lambda a: a.key)
        self._approaches = {a.approach_id: a for a in approaches[: self.max_approaches]}
        return self

    def __reduce__(self):  # pickling (Beam's fallback coder) goes through the versioned encoding
        if (self.node_k, self.approach_node_k, self.max_approaches) == _DEFAULT_CAPS:
            return (_unpickle, (self.to_bytes(),))
        return (
            _unpickle,
            (self.to_bytes(), self.node_k, self.approach_node_k, self.max_approaches),
        )

    def __repr__(self) -> str:
        return (
            f"Synthesis(n_packets={self.n_packets}, n_nodes={self.n_nodes}, "
            f"approaches={len(self._approaches)}, template_id={self.template_id!r})"
        )


_DEFAULT_CAPS = (NODE_SKETCH_K, APPROACH_NODE_SKETCH_K, MAX_TRACKED_APPROACHES)


def _unpickle(data: bytes, *caps: int) -> Synthesis:
    return Synthesis.from_bytes(data, *caps)


def _rank_round(x: float) -> float:
    """12 significant digits, so float noise from summation order cannot break a tie.

    Correctly rounded, i.e. ``round(x, 11 - floor(log10(abs(x))))`` (the two pick the decimal
    exponent differently only within 1e-13 of a power of ten, which both then round to); zero,
    infinities and nan come back as they are (a nan maybe with another sign).
    """
    return float("%.12g" % x)  # noqa: UP031 (faster than a format spec)


# --------------------------------------------------------------------------------------------
# columnar fast path


def _factorize(values: Any) -> tuple[np.ndarray, list]:
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


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    # np.sort + a mask is several times faster than np.unique on int64 in numpy 2.x.
    return _dedupe_sorted(np.sort(x))


def _dedupe_sorted(xs: np.ndarray) -> np.ndarray:
    if len(xs) > 1:
        keep = np.empty(len(xs), dtype=bool)
        keep[0] = True
        np.not_equal(xs[1:], xs[:-1], out=keep[1:])
        xs = xs[keep]
    return xs


def _dense_codes(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each x among them) for ints x in [0, size)."""
    if size <= 4 * len(x) + 4096:
        # A presence table beats a binary search per element when the key space is small.
        present = np.bincount(x, minlength=size) > 0
        return np.flatnonzero(present), (np.cumsum(present) - 1)[x]
    ux = _sorted_unique(x)
    return ux, np.searchsorted(ux, x)


def _fold_groups(
    groups: np.ndarray,
    n_groups: int,
    template_ids: Sequence[str] | str,
    node_hashes: np.ndarray,
    approach_codes: np.ndarray,
    approach_vocab: list[str],
    outcome_types: np.ndarray,
    deltas: np.ndarray,
    confidences: np.ndarray,
    event_times_ms: np.ndarray,
    node_k: int,
    approach_node_k: int,
    max_approaches: int,
) -> list[Synthesis]:
    """One fresh :class:`Synthesis` per group code 0..n_groups-1 (every group non-empty).

    ``template_ids`` is one string for all packets or one string per packet. Per-packet work is
    numpy only; Python loops run once per group and once per (group, approach) pair.
    """
    n = len(groups)
    h = np.asarray(node_hashes, dtype=np.uint64)
    ot = np.asarray(outcome_types, dtype=np.int64)
    d = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(confidences, dtype=np.float64)
    t = np.asarray(event_times_ms, dtype=np.int64)
    if not (len(h) == len(ot) == len(d) == len(w) == len(t) == len(approach_codes) == n):
        raise ValueError("all columns must have the same length")
    G = n_groups
    if n == 0:
        return []
    if ot.min() < 1 or ot.max() > 4:
        raise ValueError("invalid outcome_type in batch")
    if not (w >= 0.0).all():
        raise ValueError("confidence must be >= 0")

    counts = np.bincount(groups, minlength=G)
    tw = np.bincount(groups, weights=w, minlength=G)
    wd = np.bincount(groups, weights=w * d, minlength=G)
    mean = np.divide(wd, tw, out=np.zeros(G), where=tw > 0)
    # Two-pass M2 around each group's own mean: stable, and merges exactly by Chan's formula.
    m2 = np.bincount(groups, weights=w * (d - mean[groups]) ** 2, minlength=G)
    ws = w * np.array([0.0, 1.0, 0.5, 0.0, 0.0])[ot]
    wf = np.where(ot != _OPEN, w - ws, 0.0)
    ss = np.bincount(groups, weights=ws, minlength=G)
    fs = np.bincount(groups, weights=wf, minlength=G)
    oc = np.bincount(groups * 5 + ot, minlength=G * 5).reshape(G, 5)
    first = np.full(G, _I64_MAX, dtype=np.int64)
    np.minimum.at(first, groups, t)
    last = np.full(G, _I64_MIN, dtype=np.int64)
    np.maximum.at(last, groups, t)

    # Distinct nodes: code the hashes densely in hash order, so that sorting the single int64
    # key group*U + code sorts by (group, hash) and deduplicates both at once.
    uh, node_code = np.unique(h, return_inverse=True)
    node_code = node_code.reshape(-1)
    U = len(uh)
    gkey = _sorted_unique(groups * U + node_code)
    g_nodes, g_thr = _split_sketches(
        uh[gkey % U], np.searchsorted(gkey // U, np.arange(G + 1)), node_k
    )

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
        s._nodes_thr = g_thr[g]
        out.append(s)
    if max_approaches == 0:
        return out

    # Approaches: the same per (group, approach) pair.
    V = max(len(approach_vocab), 1)
    upair, pinv = _dense_codes(groups * V + approach_codes, G * V)
    P = len(upair)
    p_n = np.bincount(pinv, minlength=P).tolist()
    p_tw = np.bincount(pinv, weights=w, minlength=P).tolist()
    p_wd = np.bincount(pinv, weights=w * d, minlength=P).tolist()
    p_ss = np.bincount(pinv, weights=ws, minlength=P).tolist()
    p_fs = np.bincount(pinv, weights=wf, minlength=P).tolist()
    p_group = (upair // V).tolist()
    p_code = (upair % V).tolist()
    pkey = _sorted_unique(pinv * U + node_code)
    p_nodes, p_thr = _split_sketches(
        uh[pkey % U], np.searchsorted(pkey // U, np.arange(P + 1)), approach_node_k
    )
    keys = [(approach_hash(a), a) for a in approach_vocab]
    tables = [s._approaches for s in out]
    for p, code in enumerate(p_code):
        aid = approach_vocab[code]
        tables[p_group[p]][aid] = _Approach(
            aid, keys[code], p_n[p], p_tw[p], p_wd[p], p_ss[p], p_fs[p], p_nodes[p], p_thr[p]
        )
    for s in out:
        if len(s._approaches) > max_approaches:
            keep = sorted(s._approaches.values(), key=lambda a: a.key)[:max_approaches]
            s._approaches = {a.approach_id: a for a in keep}
    return out


def _min_template_per_group(
    template_ids: Sequence[str], groups: np.ndarray, n_groups: int
) -> list[str | None]:
    codes, vocab = _factorize(template_ids)
    # Rank the vocabulary lexicographically; empty ids (unset) rank last and map back to None.
    ranked = sorted(range(len(vocab)), key=lambda i: (not vocab[i], vocab[i]))
    rank_of = np.empty(len(vocab), dtype=np.int64)
    rank_of[ranked] = np.arange(len(vocab))
    best = np.full(n_groups, len(vocab) - 1, dtype=np.int64)
    np.minimum.at(best, groups, rank_of[codes])
    return [vocab[ranked[r]] or None for r in best.tolist()]


def synthesize_columns(
    address_keys: Sequence[Any] | np.ndarray,
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
    ``approach_ids`` is one string per packet or a ``(codes, vocabulary)`` pair (see
    :meth:`Synthesis.add_columns`). Node hashes come from :func:`node_hash` /
    :func:`node_hash_array`. Equal to calling :meth:`Synthesis.add` per packet, within float
    rounding, but with per-packet work done by numpy grouping (sorts and weighted bincounts).
    """
    groups, addresses = _factorize(address_keys)
    if not addresses:
        return {}
    codes, vocab = _factorize(approach_ids)
    if isinstance(template_ids, np.ndarray):
        template_ids = template_ids.tolist()
    parts = _fold_groups(
        groups,
        len(addresses),
        template_ids if isinstance(template_ids, str) else list(template_ids),
        node_hashes,
        codes,
        vocab,
        outcome_types,
        deltas,
        confidences,
        event_times_ms,
        node_k,
        approach_node_k,
        max_approaches,
    )
    return dict(zip(addresses, parts, strict=True))
