"""Synthesis records -> the intelligence store, upserted as they are produced.

Each bundle's records are collapsed to the latest snapshot per (address, window) and
upserted in batches, through one store (a connection pool) per DoFn instance. A bundle
that fails is retried by the runner and offers the same snapshots again, which the store's
rule (qis_beam.store.rule: a row moves only to a later snapshot) makes harmless; so do
restarts from a checkpoint and re-runs.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from qis_beam.store import new_run_id, open_store


class _UpsertSnapshotsFn(beam.DoFn):
    def __init__(self, store_url: str, run_id: str, batch_size: int):
        self._url = store_url
        self._run_id = run_id
        self._batch_size = batch_size
        self._rows = Metrics.counter("store", "rows_upserted")
        self._batches = Metrics.counter("store", "batches")

    def setup(self):
        # Small pool: one DoFn instance writes one batch at a time.
        self._store = open_store(self._url, create=True, pool_size=2)

    def start_bundle(self):
        self._pending: list[dict[str, Any]] = []

    def process(self, record: dict[str, Any]):
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if self._pending:
            self._rows.inc(self._store.load(self._pending, self._run_id))
            self._batches.inc()
            self._pending = []

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class WriteToStore(beam.PTransform):
    """Upsert synthesis records (all-time and windowed) into the store at ``store_url``."""

    def __init__(self, store_url: str, run_id: str | None = None, batch_size: int = 500):
        super().__init__()
        self._url = store_url
        self._run_id = run_id or new_run_id("stream")
        self._batch_size = batch_size

    def expand(self, records):
        return records | "UpsertSnapshots" >> beam.ParDo(
            _UpsertSnapshotsFn(self._url, self._run_id, self._batch_size)
        ).with_input_types(dict)
