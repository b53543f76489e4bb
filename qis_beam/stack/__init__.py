"""The local production topology on one machine, without Docker (``qis-beam stack``).

Pieces (each its own process group on 127.0.0.1, logs and PIDs in one state folder):
``postgres`` and ``pubsub`` (Debian packages), ``kafka`` (KRaft broker from Maven jars),
``prism`` (Beam's Go runner, ``go install``-ed) and ``flink`` (a session cluster rebuilt from
PyPI's Flink files). Every download is pinned by SHA-256 in ``pins.toml``.

Library use (the pytest fixtures do this)::

    from qis_beam import stack
    started = stack.up(state_dir, only=["kafka"])
    bootstrap = started["kafka"].piece.endpoints["bootstrap"]
    stack.down(state_dir)
"""

from __future__ import annotations

from pathlib import Path

from qis_beam.stack.control import (
    PIECES,
    StackError,
    add_taskmanager,
    down,
    endpoint,
    running,
    status,
    up,
)
from qis_beam.stack.digests import DigestMismatch
from qis_beam.stack.fetch import FetchError, fetch
from qis_beam.stack.health import PieceFailed, log_tail
from qis_beam.stack.paths import cache_dir, default_state_dir


def prism_path() -> Path:
    """The Prism binary (v2.77.0) in the cache, built with ``go install`` if missing.

    Raises :class:`FetchError` with one clear line when ``go`` is not installed.
    """
    from qis_beam.stack.prism import prism_path as _prism_path

    return _prism_path()


__all__ = [
    "PIECES",
    "DigestMismatch",
    "FetchError",
    "PieceFailed",
    "StackError",
    "add_taskmanager",
    "cache_dir",
    "default_state_dir",
    "down",
    "endpoint",
    "fetch",
    "log_tail",
    "prism_path",
    "running",
    "status",
    "up",
]
