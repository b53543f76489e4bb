"""Where the stack keeps its downloads (cache) and its running state (state folder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Verified downloads and assembled engines: ``$QIS_BEAM_CACHE`` or ``~/.cache/qis-beam``.

    Outside the repository so that a fresh clone reuses it and ``git clean`` never drops it.
    """
    override = os.environ.get("QIS_BEAM_CACHE")
    if override:
        return Path(override).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "qis-beam").resolve()


def default_state_dir() -> Path:
    """Logs, configuration, data and the PID file of a running stack.

    ``$QIS_STACK_DIR`` or ``$XDG_STATE_HOME/qis-beam/stack`` (``~/.local/state/qis-beam/stack``):
    one stack per user by default, found again by ``status``/``down`` and the ``local-*``
    runner profiles without flags.
    """
    override = os.environ.get("QIS_STACK_DIR")
    if override:
        return Path(override).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base, "qis-beam", "stack").resolve()
