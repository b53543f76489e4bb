"""Store URLs: ``sqlite:///abs/path``, ``sqlite:rel/path``, a plain file path (SQLite), or
``postgresql://user[:password]@host:port/db`` (also ``postgres://``)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from qis_beam.store.base import Store

POSTGRES_SCHEMES = ("postgresql", "postgres")


def store_kind(url: str) -> str:
    scheme = url.split(":", 1)[0].lower() if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) else ""
    if scheme in POSTGRES_SCHEMES:
        return "postgresql"
    if scheme in ("", "sqlite") or (len(scheme) == 1 and os.name == "nt"):
        return "sqlite"
    raise ValueError(f"unsupported store URL {redact(url)!r} (sqlite:///PATH or postgresql://...)")


def sqlite_path(url: str) -> str:
    if not url.lower().startswith("sqlite:"):
        return url
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):  # sqlite:///abs/path -> /abs/path (file-URL style)
        rest = rest[2:]
        if not rest.startswith("/"):
            raise ValueError(f"sqlite URL needs an absolute path after '//': {url!r}")
    if not rest:
        raise ValueError(f"sqlite URL without a path: {url!r}")
    return rest


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and summaries."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(url_or_path: str | os.PathLike, create: bool = False, pool_size: int = 8) -> Store:
    """The store a URL names. ``create`` makes the table (and a SQLite file) if missing;
    without it a missing SQLite file raises StoreNotFound."""
    url = os.fspath(url_or_path)
    if store_kind(url) == "postgresql":
        from qis_beam.store.postgres import PostgresStore

        return PostgresStore(url, create=create, pool_size=pool_size)
    from qis_beam.store.sqlite import SQLiteStore

    return SQLiteStore(sqlite_path(url), create=create)
