"""``up``, ``status`` and ``down`` of the stack in one state folder."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from qis_beam.stack import flink, kafka, postgres, prism, pubsub
from qis_beam.stack.health import PieceFailed, wait_healthy
from qis_beam.stack.ports import free_port, port_open
from qis_beam.stack.procs import TIE_TO_CALLER, alive, stop
from qis_beam.stack.state import Piece, Proc, load, save

#: Every piece, in start order. Each module has NAME, PORTS, launch(state_dir, ports) and
#: healthy(piece); postgres also purge(state_dir).
MODULES: dict[str, ModuleType] = {m.NAME: m for m in (postgres, pubsub, kafka, prism, flink)}
PIECES: tuple[str, ...] = tuple(MODULES)
#: Seconds each piece may take to answer its health check on a busy 2-core machine.
TIMEOUTS = {"postgres": 60, "pubsub": 90, "kafka": 120, "prism": 120, "flink": 180}
#: PostgreSQL's "fast" shutdown; SIGTERM would wait for every client to disconnect.
STOP_SIGNALS = {"postgres": signal.SIGINT}
PORTS_FILE = "ports.json"


class StackError(Exception):
    """A one-line failure of ``up``/``down`` (the CLI prints it and exits 1)."""


@dataclass
class Started:
    piece: Piece
    seconds: float  # until healthy; 0.0 when it was already running
    already_running: bool


def _ports(state_dir: Path, name: str, given: dict[str, int]) -> dict[str, int]:
    """Given ports, else the ones this state folder used before (so clients keep working
    across down/up) when still free, else new free ports."""
    try:
        previous = json.loads((state_dir / PORTS_FILE).read_text()).get(name, {})
    except (OSError, ValueError):
        previous = {}
    ports = {}
    for key in MODULES[name].PORTS:
        if given.get(key):
            ports[key] = given[key]
        elif previous.get(key) and not port_open(previous[key]):
            ports[key] = previous[key]
        else:
            ports[key] = free_port()
    return ports


def _remember_ports(state_dir: Path, name: str, ports: dict[str, int]) -> None:
    path = state_dir / PORTS_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[name] = ports
    path.write_text(json.dumps(known, indent=2, sort_keys=True))


def running(piece: Piece) -> bool:
    return all(alive(p) for p in piece.procs)


def stop_piece(piece: Piece, timeout: float = 30.0) -> list[int]:
    """Stop the recorded processes of ``piece`` (groups included); the PIDs that ran."""
    sig = STOP_SIGNALS.get(piece.name, signal.SIGTERM)
    # Reverse order: Flink's TaskManagers before their JobManager.
    return [p.pid for p in reversed(piece.procs) if stop(p, timeout, sig)]


def up(
    state_dir: Path,
    only: list[str] | None = None,
    ports: dict[str, dict[str, int]] | None = None,
    on_healthy=None,
    tie_to_caller: bool = False,
) -> dict[str, Started]:
    """Start the named pieces (default: all) and wait until each is healthy.

    Pieces already running in ``state_dir`` are left alone. If one piece fails, everything
    this call started is stopped again and :class:`PieceFailed` names the piece's log.
    ``tie_to_caller``: the pieces also stop when the calling process dies (test fixtures);
    the CLI's pieces outlive it.
    """
    token = TIE_TO_CALLER.set(tie_to_caller)
    try:
        return _up(state_dir, only, ports, on_healthy)
    finally:
        TIE_TO_CALLER.reset(token)


def _up(state_dir, only, ports, on_healthy) -> dict[str, Started]:
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in PIECES if only is None or n in only]
    unknown = sorted(set(only or ()) - set(PIECES))
    if unknown:
        raise StackError(f"unknown piece(s) {', '.join(unknown)}; choose from {', '.join(PIECES)}")
    pieces = load(state_dir)
    result: dict[str, Started] = {}
    launched: list[str] = []
    try:
        for name in names:
            old = pieces.get(name)
            if old is not None and running(old):
                result[name] = Started(old, 0.0, True)
                continue
            if old is not None:  # partly dead: stop what is left, then start afresh
                stop_piece(old)
            chosen = _ports(state_dir, name, (ports or {}).get(name, {}))
            _remember_ports(state_dir, name, chosen)
            t0 = time.monotonic()
            pieces[name] = MODULES[name].launch(state_dir, chosen)
            pieces[name].data["launched_at"] = str(t0)
            launched.append(name)
            save(state_dir, pieces)
        for name in launched:
            piece = pieces[name]
            t0 = float(piece.data.pop("launched_at"))
            wait_healthy(piece, MODULES[name].healthy, TIMEOUTS[name])
            result[name] = Started(piece, time.monotonic() - t0, False)
            save(state_dir, pieces)
            if on_healthy is not None:
                on_healthy(result[name])
    except BaseException:
        for name in launched:
            stop_piece(pieces.pop(name))
        save(state_dir, pieces)
        raise
    return result


def down(
    state_dir: Path, only: list[str] | None = None, purge: bool = False
) -> dict[str, list[int]]:
    """Stop exactly the recorded processes of the named pieces; the PIDs stopped per piece.

    ``purge`` also deletes data kept outside the state dir (PostgreSQL's, when run as root).
    """
    state_dir = Path(state_dir).resolve()
    pieces = load(state_dir)
    stopped: dict[str, list[int]] = {}
    for name in reversed(PIECES):  # Flink first, PostgreSQL last
        if only is not None and name not in only:
            continue
        if name in pieces:
            stopped[name] = stop_piece(pieces.pop(name))
            save(state_dir, pieces)
        # Also after a failed `up` that recorded nothing: its data may exist already.
        if purge and hasattr(MODULES[name], "purge"):
            MODULES[name].purge(state_dir)
    return stopped


def status(state_dir: Path) -> dict[str, Piece]:
    return load(Path(state_dir).resolve())


def endpoint(state_dir: Path, piece: str, key: str) -> str | None:
    """An endpoint of a running piece (None if not recorded or not running)."""
    recorded = load(Path(state_dir).resolve()).get(piece)
    if recorded is None or not running(recorded):
        return None
    return recorded.endpoints.get(key)


def add_taskmanager(state_dir: Path, timeout: float = 120.0, tie_to_caller: bool = False) -> Proc:
    """Start one more TaskManager for the stack's Flink (e.g. after ``kill -9`` of one).

    Dead TaskManagers are dropped from the record first; returns the new process once the
    JobManager lists it with its slots.
    """
    state_dir = Path(state_dir).resolve()
    pieces = load(state_dir)
    piece = pieces.get("flink")
    if piece is None:
        raise StackError(f"no Flink recorded in {state_dir}")
    _drop_dead_taskmanagers(piece)
    numbers = [
        int(p.role.rsplit("-", 1)[1]) for p in piece.procs if p.role.startswith("taskmanager")
    ]
    number = int(piece.data.get("taskmanagers", "1")) + 1
    number = max([number, *[n + 1 for n in numbers]])
    token = TIE_TO_CALLER.set(tie_to_caller)
    try:
        proc = flink.start_taskmanager(piece, number)
    finally:
        TIE_TO_CALLER.reset(token)
    piece.procs.append(proc)
    piece.data["taskmanagers"] = str(number)
    pieces["flink"] = piece
    save(state_dir, pieces)  # recorded before the wait, so `down` stops it if it fails
    # Only the JobManager and the new TaskManager must stay up: a TaskManager killed just
    # before this call (a signal is delivered asynchronously) is dropped, not a failure, and
    # the JobManager must list exactly the live ones.
    watched = replace(piece, procs=[p for p in piece.procs if not _is_taskmanager(p)] + [proc])
    wait_healthy(watched, lambda _: flink.healthy(_drop_dead_taskmanagers(piece)), timeout)
    save(state_dir, pieces)
    return proc


def _is_taskmanager(proc: Proc) -> bool:
    return proc.role.startswith("taskmanager")


def _drop_dead_taskmanagers(piece: Piece) -> Piece:
    piece.procs = [p for p in piece.procs if alive(p) or not _is_taskmanager(p)]
    return piece


__all__ = [
    "PIECES",
    "PieceFailed",
    "StackError",
    "Started",
    "add_taskmanager",
    "down",
    "endpoint",
    "running",
    "status",
    "up",
]
