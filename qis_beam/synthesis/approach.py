"""Per-approach sums of one address's synthesis (the delta kept as a plain weighted sum: only
its mean is reported)."""

from __future__ import annotations

from qis_beam.synthesis.hashing import approach_hash
from qis_beam.synthesis.sketch import DistinctSketch


class ApproachStats:
    __slots__ = ("approach_id", "_key", "n", "tw", "wd", "ss", "fs", "nodes")

    def __init__(
        self,
        approach_id: str,
        nodes: DistinctSketch,
        key: tuple[int, str] | None = None,
        n: int = 0,
        tw: float = 0.0,
        wd: float = 0.0,
        ss: float = 0.0,
        fs: float = 0.0,
    ) -> None:
        self.approach_id = approach_id
        self.nodes = nodes  # distinct nodes that reported this approach
        self._key = key  # computed on first use: only needed when approaches are capped
        self.n = n  # packets
        self.tw = tw  # sum of weights
        self.wd = wd  # sum of weight * delta
        self.ss = ss  # sum of weight * success score (scored outcomes only)
        self.fs = fs  # sum of weight * (1 - success score)

    @property
    def key(self) -> tuple[int, str]:
        """Tracking order: the smallest ``(approach_hash, approach_id)`` are tracked."""
        key = self._key
        if key is None:
            key = self._key = (approach_hash(self.approach_id), self.approach_id)
        return key

    def copy(self) -> ApproachStats:
        return ApproachStats(
            self.approach_id,
            self.nodes.copy(),
            self._key,
            self.n,
            self.tw,
            self.wd,
            self.ss,
            self.fs,
        )

    def merge(self, other: ApproachStats) -> None:
        self.n += other.n
        self.tw += other.tw
        self.wd += other.wd
        self.ss += other.ss
        self.fs += other.fs
        self.nodes.merge(other.nodes)
