"""One schema and one upsert for every backend (SQLite and PostgreSQL speak this SQL alike).

Statements use ``%s`` placeholders (psycopg); the SQLite backend turns them into ``?``.
"""

from __future__ import annotations

from qis_beam.store.rule import ALL_TIME, Row

TABLE = "synthesis"
COLUMNS = Row._fields

CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    address TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    window_end_ms BIGINT,
    snapshot_ms BIGINT NOT NULL,
    n_packets BIGINT NOT NULL,
    pane_index INTEGER NOT NULL,
    template_id TEXT,
    run_id TEXT NOT NULL DEFAULT '',
    written_ms BIGINT NOT NULL DEFAULT 0,
    record TEXT NOT NULL,
    PRIMARY KEY (address, window_start_ms)
)
"""

_UPDATED = [c for c in COLUMNS if c not in ("address", "window_start_ms")]

# The rule of qis_beam.store.rule.wins: strictly later snapshot, or equally late with
# different content. Row-value comparison is lexicographic in both databases.
_NEW = "(excluded.snapshot_ms, excluded.n_packets, excluded.pane_index)"
_OLD = f"({TABLE}.snapshot_ms, {TABLE}.n_packets, {TABLE}.pane_index)"
UPSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    f"ON CONFLICT (address, window_start_ms) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _UPDATED)
    + f" WHERE {_NEW} > {_OLD} OR ({_NEW} = {_OLD} AND excluded.record <> {TABLE}.record)"
)

_META = "record, run_id, snapshot_ms, written_ms"
SELECT_LATEST = f"SELECT {_META} FROM {TABLE} WHERE address = %s AND window_start_ms = {ALL_TIME}"
SELECT_WINDOWS = (
    f"SELECT {_META} FROM {TABLE} WHERE address = %s AND window_start_ms <> {ALL_TIME} "
    "AND window_start_ms < %s AND window_end_ms > %s ORDER BY window_start_ms LIMIT %s"
)
SELECT_ADDRESSES = (
    f"SELECT address FROM {TABLE} WHERE window_start_ms = {ALL_TIME} ORDER BY address"
)

# Unbounded GetWindows ranges
MIN_MS = -(2**62)
MAX_MS = 2**62
