"""The embedded default: one SQLite file (``DIR/intelligence.db`` or ``sqlite:///path``).

Reads open the file per call, read-only: a reader never holds a lock a writer waits on,
sees a store replaced whole (a new backfill published over it) at its next call, and reports
a missing or unreadable file as :class:`StoreUnavailable` until it is back. Writes are one
transaction per :meth:`load` (a run that dies half-way leaves the previous store intact).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from typing import Any

from qis_beam.store import schema
from qis_beam.store.base import (
    Store,
    StoredSynthesis,
    StoreNotFound,
    StoreUnavailable,
    decode,
    window_bounds,
)
from qis_beam.store.rule import ALL_TIME, latest_rows

_BUSY_TIMEOUT_S = 30.0  # parallel writers (a multi-process runner) wait for each other


def _q(sql: str) -> str:
    return sql.replace("%s", "?")


_JSON = "COALESCE(json_extract(record, '$.{}'), {})"

# Stores written before the snapshot order existed: add its columns, computed from records.
_MIGRATE = [
    ("snapshot_ms", "BIGINT NOT NULL DEFAULT -1", _JSON.format("last_event_ms", -1)),
    ("n_packets", "BIGINT NOT NULL DEFAULT 0", _JSON.format("n_packets", 0)),
    ("run_id", "TEXT NOT NULL DEFAULT ''", None),
    ("written_ms", "BIGINT NOT NULL DEFAULT 0", None),
]


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = os.fspath(path)
        self.url = "sqlite://" + os.path.abspath(self.path)
        if create:
            with self._write() as db:
                db.execute(schema.CREATE_TABLE)
                self._migrate(db)
        elif not os.path.exists(self.path):
            raise StoreNotFound(f"no intelligence store at {self.path}")

    def _write(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        return sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)

    def _read(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as error:
            raise StoreUnavailable(f"{self.path}: {error}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({schema.TABLE})")}
        for column, decl, value in _MIGRATE:
            if column not in have:
                db.execute(f"ALTER TABLE {schema.TABLE} ADD COLUMN {column} {decl}")
                if value:
                    db.execute(f"UPDATE {schema.TABLE} SET {column} = {value}")

    def load(self, records: Iterable[dict[str, Any]], run_id: str = "") -> int:
        """Upsert in one transaction; returns how many rows were offered."""
        rows = latest_rows(records, run_id)
        db = self._write()
        try:
            with db:
                db.executemany(_q(schema.UPSERT), rows)
        finally:
            db.close()
        return len(rows)

    def _fetch(self, sql: str, args: tuple) -> list[tuple]:
        db = self._read()
        try:
            return db.execute(_q(sql), args).fetchall()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"{self.path}: {error}") from None
        finally:
            db.close()

    def entry(self, address: str, timeout: float | None = None) -> StoredSynthesis | None:
        rows = self._fetch(schema.SELECT_LATEST, (address,))
        return decode(rows[0]) if rows else None

    def entries(self, address, from_ms=None, to_ms=None, limit=10_000, timeout=None):
        lo, hi = window_bounds(from_ms, to_ms)
        return [decode(r) for r in self._fetch(schema.SELECT_WINDOWS, (address, hi, lo, limit))]

    def addresses(self) -> list[str]:
        return [r[0] for r in self._fetch(schema.SELECT_ADDRESSES, ())]

    def ping(self, timeout: float | None = None) -> None:
        self._fetch(f"SELECT 1 FROM {schema.TABLE} WHERE window_start_ms = {ALL_TIME} LIMIT 1", ())


class IntelligenceStore(SQLiteStore):
    """The historical name of the SQLite store (``IntelligenceStore(path, create=False)``)."""
