"""Reading a run's output folder (spec section 7) into what the report shows. Beam-free.

Only local folders: ``synthesis-*.jsonl``, ``dead_letters-*.jsonl`` and ``summary.json`` as
``backfill``, ``replay`` and ``demo`` write them (copy a gs:// output down first).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter
from typing import Any

from qis_beam.report.intervals import approach_beta, credible_interval

PANE_TIMINGS = ("EARLY", "ON_TIME", "LATE", "UNKNOWN")


class NoOutputs(Exception):
    """The folder holds no run outputs (one line for the CLI)."""


class BadTruth(ValueError):
    """The --truth file is missing or not a simulator truth.json (a usage error)."""


def _json_lines(paths: list[str]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise NoOutputs(f"{path}:{number}: not JSON ({error.msg})") from None
    return records


@dataclasses.dataclass
class RunOutputs:
    output_dir: str
    summary: dict[str, Any] | None
    synthesis: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]

    @property
    def windowed(self) -> list[dict[str, Any]]:
        return [r for r in self.synthesis if r.get("window_start_ms") is not None]

    @property
    def all_time(self) -> list[dict[str, Any]]:
        return [r for r in self.synthesis if r.get("window_start_ms") is None]


def load_outputs(output_dir: str) -> RunOutputs:
    """Everything the report reads; :class:`NoOutputs` if the folder has no synthesis output."""
    if not os.path.isdir(output_dir):
        raise NoOutputs(f"{output_dir}: not a directory")
    synthesis_paths = sorted(glob.glob(os.path.join(output_dir, "synthesis-*.jsonl")))
    if not synthesis_paths:
        raise NoOutputs(
            f"{output_dir}: no synthesis-*.jsonl (not a backfill/replay --output folder)"
        )
    summary = None
    summary_path = os.path.join(output_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as handle:
            try:
                summary = json.load(handle)
            except json.JSONDecodeError as error:
                raise NoOutputs(f"{summary_path}: not JSON ({error.msg})") from None
    dead_paths = sorted(glob.glob(os.path.join(output_dir, "dead_letters-*.jsonl")))
    return RunOutputs(output_dir, summary, _json_lines(synthesis_paths), _json_lines(dead_paths))


def _snapshot_key(record: dict[str, Any]) -> tuple:
    # The newest evidence wins: an address whose state expired restarts its pane index at 0,
    # so the index alone would prefer a stale snapshot.
    pane = record.get("pane") or {}
    return (record.get("last_event_ms") or -1, pane.get("index", 0), record.get("n_packets", 0))


def latest_all_time(outputs: RunOutputs) -> dict[str, dict[str, Any]]:
    """{address: its newest all-time record}."""
    latest: dict[str, dict[str, Any]] = {}
    for r in outputs.all_time:
        current = latest.get(r["address"])
        if current is None or _snapshot_key(r) > _snapshot_key(current):
            latest[r["address"]] = r
    return latest


def final_windows(outputs: RunOutputs) -> dict[str, list[dict[str, Any]]]:
    """{address: the last pane of each of its windows, by window start}."""
    last: dict[tuple, dict[str, Any]] = {}
    for r in outputs.windowed:
        key = (r["address"], r["window_start_ms"], r["window_end_ms"])
        if key not in last or r["pane"]["index"] > last[key]["pane"]["index"]:
            last[key] = r
    by_address: dict[str, list[dict[str, Any]]] = {}
    for (address, _, _), r in sorted(last.items()):
        by_address.setdefault(address, []).append(r)
    return by_address


@dataclasses.dataclass(frozen=True)
class RankedApproach:
    rank: int
    approach_id: str
    n_packets: int
    n_nodes: int
    success_mean: float
    low: float
    high: float
    exact: bool  # interval from the row's own alpha/beta (else estimated, see intervals.py)
    mean_delta: float | None


def ranked_approaches(record: dict[str, Any]) -> list[RankedApproach]:
    """The record's approaches in its own rank order, each with a credible interval."""
    rows = []
    for rank, a in enumerate(record.get("approaches") or [], 1):
        alpha, beta, exact = approach_beta(a, record)
        low, high = credible_interval(alpha, beta)
        rows.append(
            RankedApproach(
                rank,
                a["approach_id"],
                a["n_packets"],
                a["n_nodes"],
                a["success_mean"],
                low,
                high,
                exact,
                a.get("mean_delta"),
            )
        )
    return rows


def dead_letter_counts(outputs: RunOutputs) -> Counter:
    """Dead letters by reason, from the dead-letter files (``too_late`` included)."""
    return Counter(d.get("reason", "?") for d in outputs.dead_letters)


@dataclasses.dataclass
class PaneStats:
    counts: dict[str, int]  # windowed records by pane timing
    snapshots: int  # all-time snapshots
    windows: int
    multi_pane_windows: int
    # For each non-final pane: (timing, share of the window's final n_packets it already had)
    shares: list[tuple[str, float]]
    late_packets: int  # packets the LATE panes added after the ON_TIME pane

    @property
    def streaming(self) -> bool:
        """More than one pane per window somewhere, or any non-ON_TIME pane: a replay/stream."""
        return self.multi_pane_windows > 0 or any(
            n for t, n in self.counts.items() if t != "ON_TIME"
        )


def pane_stats(outputs: RunOutputs) -> PaneStats:
    counts = {t: 0 for t in PANE_TIMINGS}
    panes: dict[tuple, list[dict[str, Any]]] = {}
    for r in outputs.windowed:
        timing = r["pane"].get("timing", "UNKNOWN")
        counts[timing] = counts.get(timing, 0) + 1
        panes.setdefault((r["address"], r["window_start_ms"], r["window_end_ms"]), []).append(r)
    shares: list[tuple[str, float]] = []
    late_packets = 0
    for window_panes in panes.values():
        window_panes.sort(key=lambda r: r["pane"]["index"])
        final = window_panes[-1]["n_packets"]
        for r in window_panes:
            if final:
                shares.append((r["pane"]["timing"], r["n_packets"] / final))
        on_time = [r["n_packets"] for r in window_panes if r["pane"]["timing"] == "ON_TIME"]
        if on_time and window_panes[-1]["pane"]["timing"] == "LATE":
            late_packets += final - on_time[-1]
    return PaneStats(
        counts=counts,
        snapshots=len(outputs.all_time),
        windows=len(panes),
        multi_pane_windows=sum(1 for p in panes.values() if len(p) > 1),
        shares=shares,
        late_packets=late_packets,
    )


@dataclasses.dataclass(frozen=True)
class TruthRow:
    address: str
    template_id: str
    recommended: str | None
    true_best: str
    regret: float | None  # true effect of the best minus that of the recommended approach
    best_rank: int | None  # where the true best sits in the reported ranking (1 = recommended)

    @property
    def match(self) -> bool:
        return self.recommended == self.true_best


def load_truth(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            truth = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise BadTruth(f"--truth {path}: {error}") from None
    if not isinstance(truth, dict) or not isinstance(truth.get("addresses"), dict):
        raise BadTruth(f"--truth {path}: no 'addresses' (not a simulator truth.json)")
    return truth


def truth_rows(latest: dict[str, dict[str, Any]], truth: dict[str, Any]) -> list[TruthRow]:
    """Recommended vs true best for every address the truth knows, in address order."""
    rows = []
    for address, facts in sorted(truth["addresses"].items()):
        record = latest.get(address) or {}
        recommended = record.get("recommended_approach")
        effects = facts.get("effects") or {}
        best = facts["best_approach"]
        regret = None
        if recommended is not None and recommended in effects and best in effects:
            regret = effects[best] - effects[recommended]
        ids = [a["approach_id"] for a in record.get("approaches") or []]
        rows.append(
            TruthRow(
                address,
                facts.get("template_id", ""),
                recommended,
                best,
                regret,
                ids.index(best) + 1 if best in ids else None,
            )
        )
    return rows


@dataclasses.dataclass(frozen=True)
class TruthPoint:
    effect: float  # the approach's true effect from truth.json
    success_mean: float  # what the all-time synthesis reports for it
    recommended: bool
    true_best: bool


def truth_points(latest: dict[str, dict[str, Any]], truth: dict[str, Any]) -> list[TruthPoint]:
    """Every reported approach that truth.json knows, across all addresses."""
    points = []
    for address, facts in sorted(truth["addresses"].items()):
        record = latest.get(address) or {}
        effects = facts.get("effects") or {}
        for rank, a in enumerate(record.get("approaches") or []):
            if a["approach_id"] in effects:
                points.append(
                    TruthPoint(
                        effects[a["approach_id"]],
                        a["success_mean"],
                        rank == 0,
                        a["approach_id"] == facts.get("best_approach"),
                    )
                )
    return points
