"""The intelligence store: an embedded SQLite file with the latest synthesis per address.

Written once per run, after the pipeline has finished, by one process reading the run's
``synthesis-*.jsonl`` (never from parallel workers: SQLite has one writer). The whole load
is one transaction, so a run that dies half-way leaves the previous store intact. Rows are
keyed by (address, window); a row is replaced only by a record of the same or a later pane,
so loading the same output twice yields the same store (idempotent).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from typing import Any

ALL_TIME = -1  # window_start_ms of all-time rows (NULL cannot be part of a primary key)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS synthesis (
    address TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    window_end_ms INTEGER,
    pane_index INTEGER NOT NULL,
    template_id TEXT,
    record TEXT NOT NULL,
    PRIMARY KEY (address, window_start_ms)
);
"""

_UPSERT = """
INSERT INTO synthesis (address, window_start_ms, window_end_ms, pane_index, template_id, record)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (address, window_start_ms) DO UPDATE SET
    window_end_ms = excluded.window_end_ms,
    pane_index = excluded.pane_index,
    template_id = excluded.template_id,
    record = excluded.record
WHERE excluded.pane_index >= synthesis.pane_index
"""


class StoreNotFound(FileNotFoundError):
    pass


class IntelligenceStore:
    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = os.fspath(path)
        if not create and not os.path.exists(self.path):
            raise StoreNotFound(f"no intelligence store at {self.path}")
        self._db = sqlite3.connect(self.path)
        if create:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> IntelligenceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self, records: Iterable[dict[str, Any]]) -> int:
        """Upsert synthesis records in one transaction; returns how many were offered."""
        rows = (
            (
                r["address"],
                ALL_TIME if r["window_start_ms"] is None else r["window_start_ms"],
                r["window_end_ms"],
                r["pane"]["index"],
                r.get("template_id"),
                json.dumps(r, separators=(",", ":")),
            )
            for r in records
        )
        with self._db:
            cursor = self._db.executemany(_UPSERT, rows)
        return cursor.rowcount

    def latest(self, address: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT record FROM synthesis WHERE address = ? AND window_start_ms = ?",
            (address, ALL_TIME),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def windows(self, address: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT record FROM synthesis WHERE address = ? AND window_start_ms != ? "
            "ORDER BY window_start_ms",
            (address, ALL_TIME),
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def addresses(self) -> list[str]:
        rows = self._db.execute(
            "SELECT DISTINCT address FROM synthesis WHERE window_start_ms = ? ORDER BY address",
            (ALL_TIME,),
        ).fetchall()
        return [r[0] for r in rows]
