"""The store's rule, free of any database: which snapshot of an (address, window) wins.

Every row the store holds is one snapshot of one (address, window) -- the all-time
synthesis or one event-time window -- produced by one run (a backfill, a replay, a stream).
Snapshots are ordered by their **snapshot time**: the latest event time folded into them
(``last_event_ms``), then their packet count, then their pane index (which only breaks ties
between snapshots of the same data: the final pane of a window or of an expiring address
repeats the statistics of the pane before it). A row is replaced only by a snapshot that is
later in that order, or by an equally late one with different content (a re-run of the same
input with other synthesis settings refreshes its rows; an identical retry writes nothing).

Why this order and not the pane index: within one life of a synthesis, state only grows
(accumulating panes, the all-time fold), so both numbers never decrease and every new pane
with new data is strictly later; a retried bundle or a restart from a checkpoint re-offers
snapshots that are at most as late as what was already stored, which therefore stays. When
an address's all-time state expires (``--state-ttl``) its next life starts after the expiry,
so its snapshots are later in event time and replace the previous life's row, although the
pipeline restarts that address's pane index at 0 (the bug a pane-index rule had).

Suppressed snapshots (privacy guard, fewer than ``--min-nodes`` nodes) carry no event times;
they rank before every visible snapshot (snapshot time -1), so one never hides a visible row.

The store is therefore the maximum, under one order, of every snapshot ever offered: the
same snapshots offered in any order, any number of times, give the same store (up to exact
ties of different content, where the later write wins).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

ALL_TIME = -1  # window_start_ms of all-time rows (NULL cannot be part of a primary key)
SUPPRESSED_SNAPSHOT_MS = -1  # snapshot time of a record without event times


class Row(NamedTuple):
    """One store row, in the column order of :data:`qis_beam.store.schema.COLUMNS`."""

    address: str
    window_start_ms: int
    window_end_ms: int | None
    snapshot_ms: int
    n_packets: int
    pane_index: int
    template_id: str | None
    run_id: str
    written_ms: int
    record: str


def snapshot_key(record: dict[str, Any]) -> tuple[int, int, int]:
    """(snapshot time, packet count, pane index): the order in which snapshots replace
    each other."""
    last = record.get("last_event_ms")
    return (
        SUPPRESSED_SNAPSHOT_MS if last is None else int(last),
        int(record.get("n_packets", 0)),
        int((record.get("pane") or {}).get("index", 0)),
    )


def row_key(record: dict[str, Any]) -> tuple[str, int]:
    start = record.get("window_start_ms")
    return (record["address"], ALL_TIME if start is None else int(start))


def encode_record(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


def to_row(record: dict[str, Any], run_id: str = "", written_ms: int | None = None) -> Row:
    address, start = row_key(record)
    snapshot_ms, n_packets, pane_index = snapshot_key(record)
    return Row(
        address=address,
        window_start_ms=start,
        window_end_ms=record.get("window_end_ms"),
        snapshot_ms=snapshot_ms,
        n_packets=n_packets,
        pane_index=pane_index,
        template_id=record.get("template_id"),
        run_id=run_id,
        written_ms=int(time.time() * 1000) if written_ms is None else written_ms,
        record=encode_record(record),
    )


def wins(new: Row, old: Row) -> bool:
    """The upsert rule (the SQL ``WHERE`` of the upsert says the same thing)."""
    new_key = (new.snapshot_ms, new.n_packets, new.pane_index)
    old_key = (old.snapshot_ms, old.n_packets, old.pane_index)
    return new_key > old_key or (new_key == old_key and new.record != old.record)


def latest_rows(records: Iterable[dict[str, Any]], run_id: str = "") -> list[Row]:
    """Collapse a batch to one row per (address, window) under the same rule, so one
    statement never touches a row twice and a batch writes only what could win."""
    best: dict[tuple[str, int], Row] = {}
    written_ms = int(time.time() * 1000)
    for record in records:
        row = to_row(record, run_id, written_ms)
        key = (row.address, row.window_start_ms)
        held = best.get(key)
        if held is None or wins(row, held):
            best[key] = row
    return list(best.values())


def new_run_id(kind: str) -> str:
    """``<kind>-<UTC time>-<random>``: names the run that wrote a row (provenance only;
    it plays no part in the order)."""
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
