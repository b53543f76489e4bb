"""Distinct counting with a mergeable bottom-k ("KMV") sketch of 64-bit hashes.

A :class:`DistinctSketch` keeps the ``k`` smallest distinct hashes it has seen. Merging two
sketches gives the bottom-k of the union, so the result never depends on how the items were
split or in which order the parts were merged. :meth:`DistinctSketch.count` is exact below ``k``
distinct items; from ``k`` on it is ``round((k - 1) * 2**64 / h_k)``, ``h_k`` being the k-th
smallest hash, an unbiased estimate with relative standard error about ``1 / sqrt(k)`` when the
hashes are uniform (node ids are SHA-256 prefixes, so theirs are).

Inside, a sketch is a collection of hashes plus a threshold ``thr``: it holds *every* distinct
hash seen that is ``<= thr`` (``thr = 2**64`` means "all of them") and, once ``thr`` is finite,
at least k of them. Which collection holds them is chosen for speed and never shows in a
result: a sketch being added to owns a mutable ``set``, pruned back to k lazily when it reaches
2k, so :meth:`add` is an O(1) set insert; decoded, merged and batch-built sketches are
immutable, sorted and at most k long, so copies share them: a ``tuple`` while small (cheap to
build, merge through a set and encode), else a uint64 array (vectorised merges and encodings;
a batch's sketches are views into one array until copied).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import numpy as np

_INF = 1 << 64  # threshold meaning "complete": above every uint64 hash
_EMPTY: tuple[int, ...] = ()
# Immutable sketches up to this many hashes are tuples (Python ints beat numpy's per-call cost).
_TUPLE_MAX = 64
# A merge into an immutable sketch goes through a Python set up to this many hashes in all,
# through a vectorised sort of both sides beyond.
_SET_MERGE_MAX = 128
_lt = operator.lt

Hashes = set[int] | tuple[int, ...] | np.ndarray


class DistinctSketch:
    """Bottom-k sketch of distinct uint64 hashes (see the module docstring)."""

    __slots__ = ("k", "_hashes", "_thr")

    def __init__(self, k: int) -> None:
        if k < 2:
            raise ValueError("a sketch keeps at least 2 hashes")
        self.k = k
        self._hashes: Hashes = _EMPTY
        self._thr = _INF

    @classmethod
    def _of(cls, k: int, hashes: Hashes, thr: int) -> DistinctSketch:
        s = cls.__new__(cls)
        s.k = k
        s._hashes = hashes
        s._thr = thr
        return s

    # ------------------------------------------------------------------------ building

    def add(self, h: int) -> None:
        """Add one hash (a Python int in [0, 2**64))."""
        hashes = self._hashes
        if type(hashes) is not set:
            hashes = self._hashes = set(_as_ints(hashes))
        if h not in hashes and h < self._thr:
            hashes.add(h)
            if len(hashes) >= 2 * self.k:
                self._hashes, self._thr = _prune(hashes, self.k)

    @classmethod
    def from_hashes(cls, hashes: Sequence[int] | np.ndarray, k: int) -> DistinctSketch:
        """The sketch of ``hashes``: any order, duplicates allowed. A stored sketch of k hashes
        may have dropped larger ones, so it is complete up to its max; sorted, distinct input
        (what :meth:`smallest` returns) is kept as it is, not re-sorted."""
        if isinstance(hashes, np.ndarray):
            return cls._of_array(np.array(hashes, dtype=np.uint64), k)
        t = hashes if type(hashes) is tuple else tuple(hashes)
        if not _ascending(t):
            t = tuple(sorted(set(t)))
        if len(t) > _TUPLE_MAX:
            return cls._of_array(np.array(t, dtype=np.uint64), k)
        if len(t) >= k:
            t = t[:k]
            return cls._of(k, t, t[-1])
        return cls._of(k, t, _INF)

    @classmethod
    def _of_array(cls, hashes: np.ndarray, k: int) -> DistinctSketch:
        """:meth:`from_hashes` for an owned uint64 array."""
        if len(hashes) > 1 and not (hashes[1:] > hashes[:-1]).all():
            hashes = sorted_unique(hashes)
        if len(hashes) >= k:
            hashes = hashes[:k].copy()
            return cls._of(k, _freeze(hashes), int(hashes[-1]))
        return cls._of(k, _freeze(hashes), _INF)

    @classmethod
    def split(cls, sorted_hashes: np.ndarray, bounds: np.ndarray, k: int) -> list[DistinctSketch]:
        """Sketches of the runs ``sorted_hashes[bounds[i]:bounds[i+1]]`` (each run sorted and
        distinct), as views into ``sorted_hashes``: copying one copies its view."""
        starts = bounds[:-1]
        ends = bounds[1:]
        cut = (ends - starts) > k
        ends = np.where(cut, starts + k, ends)
        thr = [_INF] * len(starts)
        for i in np.flatnonzero(cut).tolist():
            thr[i] = int(sorted_hashes[starts[i] + k - 1])
        out = []
        append = out.append
        new = cls.__new__
        for a, b, t in zip(starts.tolist(), ends.tolist(), thr, strict=True):
            s = new(cls)  # _of inlined: a batch builds one sketch per (group, approach) pair
            s.k = k
            s._hashes = sorted_hashes[a:b]
            s._thr = t
            append(s)
        return out

    # ------------------------------------------------------------------------ merging

    def copy(self) -> DistinctSketch:
        """An independent sketch: a set is copied, an immutable collection shared."""
        hashes = self._hashes
        if type(hashes) is set:
            hashes = set(hashes)
        elif type(hashes) is np.ndarray and hashes.base is not None:
            # A view into a whole batch's array would keep that array alive with the sketch.
            hashes = tuple(hashes.tolist()) if len(hashes) <= _TUPLE_MAX else hashes.copy()
        return self._of(self.k, hashes, self._thr)

    def merge(self, other: DistinctSketch) -> DistinctSketch:
        """Fold ``other`` in (the bottom-k of the union); ``other`` is not changed. Returns self."""
        if other.k != self.k:
            raise ValueError(f"cannot merge sketches of k={self.k} and k={other.k}")
        b = other._hashes
        if len(b) == 0:
            return self
        a = self._hashes
        if len(a) == 0:
            c = other.copy()
            self._hashes, self._thr = c._hashes, c._thr
            return self
        a_thr, k = self._thr, self.k
        thr = a_thr if a_thr < other._thr else other._thr
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
                self._hashes, self._thr = _freeze(u), thr
                return self
            # A fresh set this sketch owns from now on.
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
            self._hashes, self._thr = _prune(a, k)
        else:
            self._hashes, self._thr = a, thr
        return self

    # ------------------------------------------------------------------------ reading

    def count(self) -> int:
        """Distinct hashes seen: exact below k, else the bottom-k estimate."""
        hashes, k = self._hashes, self.k
        if len(hashes) < k:
            return len(hashes)
        kth = sorted(hashes)[k - 1] if type(hashes) is set else int(hashes[k - 1])
        return round((k - 1) * _INF / kth)

    def smallest(self) -> list[int]:
        """The (at most) k smallest hashes, ascending: what a sketch is stored as, and what
        :meth:`from_hashes` reads back into an equal sketch."""
        hashes, k = self._hashes, self.k
        if type(hashes) is set:
            return sorted(hashes)[:k]
        return hashes[:k].tolist() if type(hashes) is np.ndarray else list(hashes[:k])

    def __repr__(self) -> str:
        return f"DistinctSketch(k={self.k}, count={self.count()})"


# ---------------------------------------------------------------------------- helpers


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
    """An owned, sorted, distinct uint64 array as an immutable collection (a tuple if small)."""
    return tuple(ordered.tolist()) if len(ordered) <= _TUPLE_MAX else ordered


def _ascending(t: tuple[int, ...]) -> bool:
    """Strictly increasing (so sorted and distinct)."""
    m = len(t)
    if m < 3:
        return m < 2 or t[0] < t[1]
    if m == 3:
        return t[0] < t[1] < t[2]
    return all(map(_lt, t, t[1:]))


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` for int arrays: sort + mask is several times faster in numpy 2.x."""
    return _dedupe_sorted(np.sort(x))


def _dedupe_sorted(xs: np.ndarray) -> np.ndarray:
    if len(xs) > 1:
        keep = np.empty(len(xs), dtype=bool)
        keep[0] = True
        np.not_equal(xs[1:], xs[:-1], out=keep[1:])
        xs = xs[keep]
    return xs
