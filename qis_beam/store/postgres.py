"""The serving store: a PostgreSQL server, through psycopg 3 and its connection pool.

The pool opens in the background, so a service can start before its database and serve
``UNAVAILABLE`` until it answers. A connection broken by a server restart is found by the
first statement that uses it; reads then check the pool (dropping broken connections) and
try once more, so one restart costs callers at most the calls in flight.

The service reads through a second, asyncio pool (:meth:`aentry`...), opened on the event
loop of its first read, with the same recovery rules; every async read is bounded as a whole
(connection wait and query) by its timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from qis_beam.store import schema
from qis_beam.store.base import Store, StoredSynthesis, StoreUnavailable, decode, window_bounds
from qis_beam.store.rule import latest_rows

# Waiting for a connection longer than this is a store that is down, whatever the deadline.
MAX_WAIT_S = 5.0
RECONNECT_S = 2.0
_LOCK_ID = 0x71697362  # "qisb": serialises concurrent CREATE TABLE IF NOT EXISTS


def _pool_options(pool_size: int, name: str) -> dict[str, Any]:
    return dict(
        min_size=1,
        max_size=max(1, pool_size),
        open=False,
        timeout=MAX_WAIT_S,
        # Give a failing connection attempt up soon: psycopg_pool retries it with an
        # exponential backoff (1 s, 2 s, 4 s, ...), so after a long outage the pool would
        # come back long after the server. Given up, the next call starts a fresh attempt
        # at once, so the store answers again within a call of the server's return.
        reconnect_timeout=RECONNECT_S,
        # prepare_threshold 0: every read is a prepared statement from its first use.
        kwargs={"autocommit": True, "connect_timeout": 3, "prepare_threshold": 0},
        name=name,
    )


def _unavailable(error: Exception) -> StoreUnavailable:
    if isinstance(error, psycopg.errors.UndefinedTable):
        return StoreUnavailable("PostgreSQL: no synthesis table yet (no run wrote)")
    return StoreUnavailable(f"PostgreSQL: {str(error).strip()}")


class PostgresStore(Store):
    def __init__(self, url: str, create: bool = False, pool_size: int = 8):
        self.url = url
        self._pool_size = pool_size
        self._pool = ConnectionPool(url, **_pool_options(pool_size, "qis-store"))
        self._pool.open(wait=False)
        self._apool: AsyncConnectionPool | None = None
        if create:
            self._run(self._create, MAX_WAIT_S)

    @staticmethod
    def _create(conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            conn.execute(schema.CREATE_TABLE)

    def _run(self, work, timeout: float | None, retry: bool = True):
        wait = MAX_WAIT_S if timeout is None else max(0.001, min(timeout, MAX_WAIT_S))
        try:
            with self._pool.connection(timeout=wait) as conn:
                return work(conn)
        except PoolTimeout as error:
            raise StoreUnavailable(f"PostgreSQL: no connection within {wait:.3g}s") from error
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            if retry:
                self._pool.check()  # drop connections a restart broke, then once more
                return self._run(work, timeout, retry=False)
            raise StoreUnavailable(f"PostgreSQL: {str(error).strip()}") from error
        except psycopg.Error as error:  # no table yet, no privilege: cannot be read now
            raise _unavailable(error) from error

    def load(self, records: Iterable[dict[str, Any]], run_id: str = "") -> int:
        rows = latest_rows(records, run_id)

        def upsert(conn: psycopg.Connection) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(schema.UPSERT, rows)

        # A failed transaction wrote nothing, so a retry is the same upsert again.
        if rows:
            self._run(upsert, None)
        return len(rows)

    def _fetch(self, sql: str, args: tuple, timeout: float | None) -> list[tuple]:
        return self._run(lambda conn: conn.execute(sql, args).fetchall(), timeout)

    def entry(self, address: str, timeout: float | None = None) -> StoredSynthesis | None:
        rows = self._fetch(schema.SELECT_LATEST, (address,), timeout)
        return decode(rows[0]) if rows else None

    def entries(self, address, from_ms=None, to_ms=None, limit=10_000, timeout=None):
        lo, hi = window_bounds(from_ms, to_ms)
        rows = self._fetch(schema.SELECT_WINDOWS, (address, hi, lo, limit), timeout)
        return [decode(r) for r in rows]

    def addresses(self) -> list[str]:
        return [r[0] for r in self._fetch(schema.SELECT_ADDRESSES, (), None)]

    def ping(self, timeout: float | None = None) -> None:
        self._fetch("SELECT 1", (), timeout)

    def close(self) -> None:
        self._pool.close()

    # --- async reads (the service) ------------------------------------------------------

    async def _async_pool(self) -> AsyncConnectionPool:
        if self._apool is None:
            pool = AsyncConnectionPool(self.url, **_pool_options(self._pool_size, "qis-aread"))
            await pool.open(wait=False)
            if self._apool is None:
                self._apool = pool
            else:  # another read opened one meanwhile
                await pool.close()
        return self._apool

    async def _afetch(self, sql: str, args: tuple, timeout: float | None, retry=True):
        wait = MAX_WAIT_S if timeout is None else max(0.001, min(timeout, MAX_WAIT_S))
        pool = await self._async_pool()
        try:
            async with asyncio.timeout(wait), pool.connection(timeout=wait) as conn:
                cursor = await conn.execute(sql, args)
                return await cursor.fetchall()
        except (PoolTimeout, TimeoutError) as error:
            raise StoreUnavailable(f"PostgreSQL: no answer within {wait:.3g}s") from error
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            if retry:
                await pool.check()  # drop connections a restart broke, then once more
                return await self._afetch(sql, args, timeout, retry=False)
            raise _unavailable(error) from error
        except psycopg.Error as error:
            raise _unavailable(error) from error

    async def aentry(self, address: str, timeout: float | None = None):
        rows = await self._afetch(schema.SELECT_LATEST, (address,), timeout)
        return decode(rows[0]) if rows else None

    async def aentries(self, address, from_ms=None, to_ms=None, limit=10_000, timeout=None):
        lo, hi = window_bounds(from_ms, to_ms)
        rows = await self._afetch(schema.SELECT_WINDOWS, (address, hi, lo, limit), timeout)
        return [decode(r) for r in rows]

    async def aping(self, timeout: float | None = None) -> None:
        await self._afetch("SELECT 1", (), timeout)

    async def aclose(self) -> None:
        pool, self._apool = self._apool, None
        if pool is not None:
            await pool.close()
