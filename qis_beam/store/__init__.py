"""The intelligence store: the latest synthesis per (address, window), behind a URL.

``open_store("sqlite:///DIR/intelligence.db")`` (the embedded default, also a plain path) or
``open_store("postgresql://user@host:port/db")`` (the serving store a streaming job writes
continuously). Both backends share one schema and one upsert rule (:mod:`.rule`).
"""

from qis_beam.store.base import (
    Store,
    StoredSynthesis,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)
from qis_beam.store.rule import ALL_TIME, new_run_id, snapshot_key
from qis_beam.store.sqlite import IntelligenceStore, SQLiteStore
from qis_beam.store.url import open_store, redact, store_kind

__all__ = [
    "ALL_TIME",
    "IntelligenceStore",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreNotFound",
    "StoreUnavailable",
    "StoredSynthesis",
    "new_run_id",
    "open_store",
    "redact",
    "snapshot_key",
    "store_kind",
]
