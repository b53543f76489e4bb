"""The mergeable per-address accumulator: :class:`Synthesis`.

One :class:`Synthesis` holds one address over one window (or all time). The same object backs
the Beam ``CombineFn`` (``add`` / ``merge`` / ``extract``), the stateful all-time DoFn (which
stores ``to_bytes()``) and the benchmark's tight-loop reference.

Mergeability. Every statistic is a commutative monoid: counts and weighted sums add, the
weighted mean and its ``M2`` combine with Chan et al.'s parallel formula, event times take
min/max, the template id takes the lexicographic minimum, and both bounded sets below are
"bottom-k by hash", whose merge is the bottom-k of the union. Results therefore agree (within
float rounding) whatever the bundling, split or merge order.

Bounded size (the accumulator does not grow with the number of packets):

* **Distinct nodes** are a :class:`~qis_beam.synthesis.sketch.DistinctSketch` of node hashes:
  ``NODE_SKETCH_K`` = 4096 per address (1.6% relative error past that), ``APPROACH_NODE_SKETCH_K``
  = 1024 per approach (3.1%). Worst case per address: 32 KiB + 256 x 8 KiB of hashes.
* **Approaches**: at most ``MAX_TRACKED_APPROACHES`` = 256 per address are tracked, those with
  the smallest ``(approach_hash, approach_id)``. That set is the bottom-256 of all approach ids
  ever seen, so it is the same whatever the merge order, and a tracked approach's statistics are
  always complete (it cannot have been evicted from any part). Packets of untracked approaches
  still count in every address-level statistic.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from qis_beam.synthesis import encoding
from qis_beam.synthesis.approach import ApproachStats
from qis_beam.synthesis.hashing import approach_hash
from qis_beam.synthesis.params import DEFAULT_PARAMS, SynthesisParams
from qis_beam.synthesis.ranking import rank_key
from qis_beam.synthesis.sketch import DistinctSketch
from qis_beam.wire import OUTCOME_NAMES, SCORE_BY_TYPE

NODE_SKETCH_K = 4096  # distinct nodes counted exactly up to this many per address
APPROACH_NODE_SKETCH_K = 1024  # ... and up to this many per approach
MAX_TRACKED_APPROACHES = 256  # per address

I64_MAX = (1 << 63) - 1  # first_event_ms of an empty accumulator
I64_MIN = -(1 << 63)  # last_event_ms of an empty accumulator
_DEFAULT_CAPS = (NODE_SKETCH_K, APPROACH_NODE_SKETCH_K, MAX_TRACKED_APPROACHES)
_VALID_OUTCOMES = frozenset(OUTCOME_NAMES)


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
        self.first_event_ms = I64_MAX
        self.last_event_ms = I64_MIN
        self.template_id: str | None = None
        self._nodes = DistinctSketch(node_k)
        self._approaches: dict[str, ApproachStats] = {}
        # Key of the largest tracked approach, cached while the approach table is full.
        self._approach_max: tuple[int, str] | None = None

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
        s = SCORE_BY_TYPE[outcome_type]
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
        self._nodes.add(h)

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
        a.nodes.add(h)

    def _track(self, approach_id: str) -> ApproachStats | None:
        """Start tracking a new approach, or None if it is outside the bottom-k by hash."""
        approaches = self._approaches
        if len(approaches) < self.max_approaches:
            a = ApproachStats(approach_id, DistinctSketch(self.approach_node_k))
            approaches[approach_id] = a
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
        a = approaches[approach_id] = ApproachStats(
            approach_id, DistinctSketch(self.approach_node_k), key
        )
        self._approach_max = max(a.key for a in approaches.values())
        return a

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
        # columnar builds Synthesis objects, so it imports this module: import it late.
        from qis_beam.synthesis.columnar import synthesize_columns

        n = len(node_hashes)
        if n == 0:
            return
        node_k, approach_node_k, max_approaches = self._caps()
        (part,) = synthesize_columns(
            (np.zeros(n, dtype=np.int64), [None]),  # one address: this one
            template_id,
            node_hashes,
            approach_ids,
            outcome_types,
            deltas,
            confidences,
            event_times_ms,
            node_k=node_k,
            approach_node_k=approach_node_k,
            max_approaches=max_approaches,
        ).values()
        self._merge(part, copy=False)

    # ---------------------------------------------------------------------------- merging

    def _caps(self) -> tuple[int, int, int]:
        return (self.node_k, self.approach_node_k, self.max_approaches)

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
        c._nodes = self._nodes.copy()
        c._approaches = {aid: a.copy() for aid, a in self._approaches.items()}
        c._approach_max = self._approach_max
        return c

    def merge(self, other: Synthesis) -> Synthesis:
        """Fold ``other`` into this accumulator (in place) and return self."""
        return self._merge(other, copy=True)

    def _merge(self, other: Synthesis, copy: bool) -> Synthesis:
        """``copy=False`` lets self take over ``other``'s parts: only for an ``other`` that
        nothing else holds."""
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
        self._nodes.merge(other._nodes)

        mine = self._approaches
        for aid, oa in other._approaches.items():
            a = mine.get(aid)
            if a is None:
                mine[aid] = oa.copy() if copy else oa
            else:
                a.merge(oa)
        if len(mine) > self.max_approaches:
            # Bottom-k of the union: the same tracked set whatever the merge order.
            keep = sorted(mine.values(), key=lambda a: a.key)[: self.max_approaches]
            self._approaches = {a.approach_id: a for a in keep}
        self._approach_max = None
        return self

    # ---------------------------------------------------------------------------- output

    @property
    def n_nodes(self) -> int:
        return self._nodes.count()

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

        # Only the reported rows are turned into dicts.
        ranked = []
        min_support = params.min_support
        for a in self._approaches.values():
            if a.n < min_support:
                continue
            a_succ = _ratio(1.0 + a.ss, 2.0 + a.ss + a.fs)
            a_mean = a.wd / a.tw if a.tw > 0.0 else None
            ranked.append((rank_key(a.approach_id, a_succ, a_mean), a, a_mean, a_succ))
        ranked.sort()
        approaches = [
            {
                "approach_id": a.approach_id,
                "n_packets": a.n,
                "n_nodes": a.nodes.count(),
                "total_weight": a.tw,
                "mean_delta": a_mean,
                "success_mean": a_succ,
            }
            for _, a, a_mean, a_succ in ranked[: max(params.top_k, 0)]
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
            "success_mean": _ratio(alpha, alpha + beta),
            "outcome_counts": {name: self.outcome_counts[t] for t, name in OUTCOME_NAMES.items()},
            "approaches": approaches,
            "recommended_approach": approaches[0]["approach_id"] if approaches else None,
            "first_event_ms": None if empty else int(self.first_event_ms),
            "last_event_ms": None if empty else int(self.last_event_ms),
            "suppressed": False,
        }

    # ---------------------------------------------------------------------------- encoding

    def to_bytes(self) -> bytes:
        """``qis.v1.SynthesisState``, canonical: the same state gives the same bytes."""
        return encoding.encode(self)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        node_k: int = NODE_SKETCH_K,
        approach_node_k: int = APPROACH_NODE_SKETCH_K,
        max_approaches: int = MAX_TRACKED_APPROACHES,
    ) -> Synthesis:
        return encoding.decode_into(cls(node_k, approach_node_k, max_approaches), data)

    def __reduce__(self):  # pickling (Beam's fallback coder) goes through the versioned encoding
        caps = self._caps()
        return (
            _unpickle,
            (self.to_bytes(),) if caps == _DEFAULT_CAPS else (self.to_bytes(), *caps),
        )

    def __repr__(self) -> str:
        return (
            f"Synthesis(n_packets={self.n_packets}, n_nodes={self.n_nodes}, "
            f"approaches={len(self._approaches)}, template_id={self.template_id!r})"
        )


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, nan where the denominator is 0. Sums of non-negative
    weights keep the success denominators >= 2; only a state no fold writes (negative sums
    decoded from bytes) reaches 0, and reading it must not raise."""
    return numerator / denominator if denominator else math.nan


def _unpickle(data: bytes, *caps: int) -> Synthesis:
    return Synthesis.from_bytes(data, *caps)
