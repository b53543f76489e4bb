"""The intelligence store on both backends: URLs, the upsert order of all-time and window rows
(snapshot time, not pane index), retries in any order, the rule across runs, old SQLite
stores, a store that is down.

PostgreSQL tests use a fresh database on the ``pg_server`` fixture (the stack's
``postgres_url``, or a private server started for the session).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3

import pytest
from pg_local import fresh_database

from qis_beam.store import (
    IntelligenceStore,
    StoreNotFound,
    StoreUnavailable,
    open_store,
    redact,
    snapshot_key,
    store_kind,
)
from qis_beam.store.url import sqlite_path

A = "a" * 64
B = "b" * 64
H = 3_600_000
T0 = 1_767_225_600_000


def rec(address=A, n=1, last=T0, index=0, window=None, approach="x", suppressed=False, **extra):
    """A synthesis record as the pipeline writes it (only the fields the store reads, plus
    a recommendation so content can differ)."""
    start, end = (None, None) if window is None else (window, window + H)
    r = {
        "address": address,
        "template_id": "t/v1",
        "window_start_ms": start,
        "window_end_ms": end,
        "pane": {"timing": "ON_TIME", "index": index, "is_last": False},
    }
    if suppressed:
        del r["template_id"]
        r.update(n_packets=n, n_nodes=1, suppressed=True)
        return r
    r.update(
        n_packets=n,
        n_nodes=2,
        first_event_ms=T0 - H,
        last_event_ms=last,
        recommended_approach=approach,
        suppressed=False,
        **extra,
    )
    return r


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/intelligence.db"
    return fresh_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def store(store_url):
    s = open_store(store_url, create=True)
    yield s
    s.close()


def test_store_urls():
    assert store_kind("postgresql://u@h:5/db") == store_kind("postgres://h/db") == "postgresql"
    assert store_kind("/tmp/x.db") == store_kind("sqlite:///tmp/x.db") == "sqlite"
    assert sqlite_path("sqlite:///tmp/x.db") == "/tmp/x.db"
    assert sqlite_path("sqlite:rel/x.db") == "rel/x.db"
    assert sqlite_path("out/intelligence.db") == "out/intelligence.db"
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h:5/db") == "postgresql://u@h:5/db"
    for bad in ("mysql://h/db", "sqlite://relative.db", "sqlite:"):
        with pytest.raises(ValueError):
            open_store(bad)


def row_of(store, window):
    """The stored entry of (A, window): the all-time row for None."""
    if window is None:
        return store.entry(A)
    (entry,) = [e for e in store.entries(A) if e.record["window_start_ms"] == window]
    return entry


@pytest.mark.parametrize("window", [None, T0], ids=["all-time", "window"])
def test_order_is_snapshot_time_not_pane_index(store, window):
    """Each snapshot is its own load (its own upsert statement), so the database's guard
    decides, not the in-batch collapse."""

    def offer(**kw):
        store.load([rec(window=window, **kw)], "run-1")
        return row_of(store, window).record["n_packets"]

    assert offer(n=5, last=T0 + 50, index=7) == 5
    # an older snapshot never overwrites a newer one, even with a higher pane index
    assert offer(n=4, last=T0 + 40, index=9) == 5
    assert offer(n=9, last=T0 + 49, index=0) == 5  # more packets but older
    # same latest event, more packets (a late packet inside the span): replaces it
    assert offer(n=6, last=T0 + 50, index=0) == 6
    assert offer(n=5, last=T0 + 50, index=8) == 6  # fewer packets at the same time
    # later event time wins even with fewer packets and pane index 0: the next life of an
    # address whose all-time state expired (the pane-index bug)
    assert offer(n=1, last=T0 + 10 * H, index=0) == 1
    entry = row_of(store, window)
    assert entry.snapshot_ms == T0 + 10 * H and entry.run_id == "run-1"
    # rows of another (address, window) are untouched by all this
    other = None if window is not None else T0
    store.load([rec(n=2, last=T0, window=other)], "run-2")
    assert offer(n=1, last=T0 + 10 * H, index=0) == 1
    assert row_of(store, other).record["n_packets"] == 2


def test_any_order_any_number_of_retries_gives_the_same_store(store_url, tmp_path):
    # one run's snapshots of two addresses, all-time and two windows, over two state lives
    offered = []
    for address in (A, B):
        for i in range(6):
            offered.append(rec(address, n=i + 1, last=T0 + i * 1000, index=i))
            offered.append(rec(address, n=i + 1, last=T0 + i * 1000, index=i, window=T0))
        offered.append(rec(address, n=2, last=T0 + 5 * H, index=0))  # second life
        offered.append(rec(address, n=3, last=T0 + H + 5, index=0, window=T0 + H))
    expected = None
    for seed in range(4):
        rng = random.Random(seed)
        batch = offered + rng.sample(offered, len(offered) // 2)  # retried bundles
        rng.shuffle(batch)
        url = store_url if seed == 0 else _another(store_url, tmp_path, seed)
        with open_store(url, create=True) as s:
            for i in range(0, len(batch), 5):  # small bundles
                s.load(batch[i : i + 5], "stream-x")
            got = {a: (s.latest(a), s.windows(a)) for a in (A, B)}
        if expected is None:
            expected = got
        assert got == expected
    for address in (A, B):
        latest, windows = expected[address]
        assert latest["n_packets"] == 2 and latest["last_event_ms"] == T0 + 5 * H
        assert [w["n_packets"] for w in windows] == [6, 3]


def _another(store_url: str, tmp_path, seed: int) -> str:
    if store_url.startswith("sqlite"):
        return f"sqlite://{tmp_path}/s{seed}.db"
    return fresh_database(store_url.rsplit("/", 1)[0] + "/postgres")


def test_identical_retry_writes_nothing_and_equal_snapshot_refreshes(store):
    store.load([rec(n=3, last=T0, approach="x")], "backfill-1")
    store.load([rec(n=3, last=T0, approach="x")], "backfill-2")
    assert store.entry(A).run_id == "backfill-1"  # identical: untouched
    # same snapshot time and count, different content (other --top-k, say): refreshed
    store.load([rec(n=3, last=T0, approach="y")], "backfill-3")
    entry = store.entry(A)
    assert entry.run_id == "backfill-3" and entry.record["recommended_approach"] == "y"


def test_suppressed_snapshot_never_hides_a_visible_one(store):
    store.load([rec(n=5, last=T0)], "r")
    store.load([rec(n=9, suppressed=True, index=3)], "r")
    assert store.latest(A)["suppressed"] is False
    assert snapshot_key(rec(n=9, suppressed=True, index=3)) == (-1, 9, 3)
    store.load([rec(B, n=1, suppressed=True)], "r")
    store.load([rec(B, n=2, suppressed=True)], "r")
    assert store.latest(B) == rec(B, n=2, suppressed=True)


def test_one_batch_with_several_snapshots_of_a_row(store):
    # one statement must never touch a row twice (PostgreSQL refuses it): collapsed first
    store.load([rec(n=2, last=T0 + 2), rec(n=1, last=T0 + 1), rec(n=3, last=T0 + 3)], "r")
    assert store.latest(A)["n_packets"] == 3


def test_windows_range_and_unknown_address(store):
    store.load([rec(n=1, last=T0 + i * H + 1, window=T0 + i * H) for i in range(5)], "r")
    store.load([rec(n=1, last=T0)], "r")
    starts = [e.record["window_start_ms"] for e in store.entries(A, T0 + H, T0 + 3 * H)]
    assert starts == [T0 + H, T0 + 2 * H]
    # a window overlapping the range's start counts
    assert [e.record["window_start_ms"] for e in store.entries(A, T0 + H + 1, T0 + 2 * H)] == [
        T0 + H
    ]
    assert len(store.entries(A, limit=2)) == 2 and len(store.windows(A)) == 5
    assert store.entry(B) is None and store.entries(B) == []
    assert store.addresses() == [A]


def test_rule_across_runs(store):
    """Backfill January; backfill February (another period); backfill December (older);
    a stream updating it in March; a backfill rebuilding December-February in one run.
    Every row is exactly one run's snapshot, and which one follows from the rule."""
    dec, jan, feb, mar = T0 - 31 * 24 * H, T0, T0 + 31 * 24 * H, T0 + 59 * 24 * H

    def run(name, first, last, n, windows, approach="x"):
        records = [rec(n=n, last=last, approach=approach, first=first)]
        records += [rec(n=n // len(windows), last=w + H - 1, window=w) for w in windows]
        store.load(records, name)

    run("backfill-jan", jan, jan + 10 * H, 100, [jan, jan + H])
    run("backfill-feb", feb, feb + 10 * H, 40, [feb])
    # all-time: the run with the latest data (February), windows of both periods kept
    assert store.entry(A).run_id == "backfill-feb"
    assert {e.run_id for e in store.entries(A)} == {"backfill-jan", "backfill-feb"}
    run("backfill-dec", dec, dec + 10 * H, 500, [dec])
    assert store.entry(A).run_id == "backfill-feb"  # older data never replaces newer
    assert [e.run_id for e in store.entries(A)] == [
        "backfill-dec",
        "backfill-jan",
        "backfill-jan",
        "backfill-feb",
    ]
    # a stream from March: its snapshots carry later events, so its all-time row wins
    store.load([rec(n=3, last=mar + 5, index=0), rec(n=3, last=mar + 5, window=mar)], "stream")
    assert store.entry(A).run_id == "stream" and store.latest(A)["n_packets"] == 3
    # rebuilding December-February in one run: its windows replace each period's rows
    # where it has more (or other) data; the stream's later all-time row stays
    run("rebuild", dec, feb + 10 * H, 700, [dec, jan, jan + H, feb], approach="z")
    assert store.entry(A).run_id == "stream"
    by_start = {e.record["window_start_ms"]: e.run_id for e in store.entries(A)}
    assert by_start == {
        dec: "backfill-dec",
        jan: "rebuild",
        jan + H: "rebuild",
        feb: "rebuild",
        mar: "stream",
    }
    for entry in [store.entry(A), *store.entries(A)]:
        # no row mixes runs: its record is whole, and its snapshot time is its own
        assert entry.snapshot_ms == snapshot_key(entry.record)[0]


def test_sqlite_store_missing_and_unreadable(tmp_path):
    path = tmp_path / "intelligence.db"
    with pytest.raises(StoreNotFound):
        IntelligenceStore(path)
    with pytest.raises(StoreNotFound):
        open_store(f"sqlite://{path}")
    with open_store(str(path), create=True) as s:
        s.load([rec()], "r")
        os.rename(path, tmp_path / "aside.db")
        with pytest.raises(StoreUnavailable):
            s.latest(A)
        os.rename(tmp_path / "aside.db", path)
        assert s.latest(A) == rec()  # back: answers again


def test_old_sqlite_store_is_migrated(tmp_path):
    """A store written before the snapshot order (pane_index rule) keeps working."""
    path = tmp_path / "intelligence.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE synthesis (address TEXT NOT NULL, window_start_ms INTEGER NOT NULL,"
        " window_end_ms INTEGER, pane_index INTEGER NOT NULL, template_id TEXT,"
        " record TEXT NOT NULL, PRIMARY KEY (address, window_start_ms));"
    )
    old = rec(n=5, last=T0 + 50, index=7)
    db.execute("INSERT INTO synthesis VALUES (?, -1, NULL, 7, 't/v1', ?)", (A, json.dumps(old)))
    db.commit()
    db.close()
    with IntelligenceStore(path, create=True) as s:
        assert s.entry(A).snapshot_ms == T0 + 50
        s.load([rec(n=4, last=T0 + 40, index=9)], "r")
        assert s.latest(A) == old
        s.load([rec(n=1, last=T0 + H)], "r")
        assert s.latest(A)["n_packets"] == 1


@pytest.mark.slow
def test_postgres_down_is_unavailable_then_recovers(serving_postgres):
    url = fresh_database(serving_postgres.url)
    with open_store(url, create=True) as s:
        s.load([rec()], "r")
        serving_postgres.stop()
        try:
            with pytest.raises(StoreUnavailable):
                s.entry(A, timeout=1.0)
            with pytest.raises(StoreUnavailable):
                s.load([rec(n=2, last=T0 + 1)], "r")
        finally:
            serving_postgres.start()
        assert s.latest(A) == rec()
        s.load([rec(n=2, last=T0 + 1)], "r")
        assert s.latest(A)["n_packets"] == 2
