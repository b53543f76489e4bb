"""What every store backend offers, and the errors callers can tell apart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from qis_beam.store.schema import MAX_MS, MIN_MS


class StoreError(Exception):
    pass


class StoreNotFound(StoreError, FileNotFoundError):
    """The store does not exist (a SQLite file that is not there)."""


class StoreUnavailable(StoreError):
    """The store exists but cannot be reached now (server down, file unreadable); retry."""


@dataclasses.dataclass(frozen=True)
class StoredSynthesis:
    """A stored snapshot and where it came from."""

    record: dict[str, Any]
    run_id: str
    snapshot_ms: int  # the order key's time (rule.snapshot_key)
    written_ms: int


def decode(row: tuple) -> StoredSynthesis:
    record, run_id, snapshot_ms, written_ms = row
    return StoredSynthesis(json.loads(record), run_id or "", int(snapshot_ms), int(written_ms))


class Store:
    """Backends implement ``load``, ``entry``, ``entries``, ``addresses``, ``ping``, ``close``."""

    url: str

    def load(self, records: Iterable[dict[str, Any]], run_id: str = "") -> int:
        raise NotImplementedError

    def entry(self, address: str, timeout: float | None = None) -> StoredSynthesis | None:
        """The all-time snapshot of an address."""
        raise NotImplementedError

    def entries(
        self,
        address: str,
        from_ms: int | None = None,
        to_ms: int | None = None,
        limit: int = 10_000,
        timeout: float | None = None,
    ) -> list[StoredSynthesis]:
        """Window snapshots of an address overlapping [from_ms, to_ms), by window start."""
        raise NotImplementedError

    def addresses(self) -> list[str]:
        raise NotImplementedError

    def ping(self, timeout: float | None = None) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # The service's reads, from its event loop. By default the blocking read runs on a worker
    # thread (SQLite: a file read per call); PostgreSQL overrides them with an asyncio pool.
    async def aentry(self, address: str, timeout: float | None = None) -> StoredSynthesis | None:
        return await asyncio.to_thread(self.entry, address, timeout)

    async def aentries(self, address, from_ms=None, to_ms=None, limit=10_000, timeout=None):
        return await asyncio.to_thread(self.entries, address, from_ms, to_ms, limit, timeout)

    async def aping(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.ping, timeout)

    async def aclose(self) -> None:
        """Release what the async reads opened (called on the loop that used them)."""

    # Plain records, as `qis-beam query` prints them.
    def latest(self, address: str) -> dict[str, Any] | None:
        found = self.entry(address)
        return found.record if found else None

    def windows(self, address: str) -> list[dict[str, Any]]:
        return [e.record for e in self.entries(address)]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def window_bounds(from_ms: int | None, to_ms: int | None) -> tuple[int, int]:
    return (MIN_MS if from_ms is None else from_ms, MAX_MS if to_ms is None else to_ms)
