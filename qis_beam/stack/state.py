"""The state file ``<state dir>/stack.json``: which processes the stack started, and where.

``down`` stops exactly the processes recorded here. Each process is recorded with its PID,
its process group (each piece is started in a new session, so the group holds the piece and
its children only) and its start time in clock ticks: a PID reused by an unrelated process
after a reboot or a crash is therefore never signalled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "stack.json"


@dataclass
class Proc:
    role: str  # e.g. "jobmanager", "taskmanager", "broker"
    pid: int
    pgid: int
    start_ticks: int
    log: str
    command: list[str] = field(default_factory=list)


@dataclass
class Piece:
    name: str
    procs: list[Proc]
    endpoints: dict[str, str]
    log: str  # the main log, named in failure messages
    data: dict[str, str] = field(default_factory=dict)  # piece-specific paths and settings

    @staticmethod
    def from_json(raw: dict) -> Piece:
        return Piece(
            name=raw["name"],
            procs=[Proc(**p) for p in raw["procs"]],
            endpoints=dict(raw["endpoints"]),
            log=raw["log"],
            data=dict(raw.get("data", {})),
        )


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def load(state_dir: Path) -> dict[str, Piece]:
    """The recorded pieces by name ({} when nothing was started in ``state_dir``)."""
    try:
        raw = json.loads(state_path(state_dir).read_text())
    except FileNotFoundError:
        return {}
    return {name: Piece.from_json(piece) for name, piece in raw.get("pieces", {}).items()}


def save(state_dir: Path, pieces: dict[str, Piece]) -> None:
    """Atomically replace the state file (a crash never leaves half a PID list)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    body = {"pieces": {name: asdict(piece) for name, piece in pieces.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".stack.", dir=state_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2, sort_keys=True)
    os.replace(tmp, state_path(state_dir))
