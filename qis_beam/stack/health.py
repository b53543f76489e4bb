"""Wait for a started piece to answer its health check, or fail with its log's path."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qis_beam.stack.procs import alive, exit_code
from qis_beam.stack.state import Piece


class PieceFailed(Exception):
    """A piece did not come up; the message is one line naming its log."""

    def __init__(self, piece: str, why: str, log: str):
        self.piece, self.why, self.log = piece, why, log
        super().__init__(f"{piece} did not come up ({why}); log: {log}")


def log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_healthy(piece: Piece, check: Callable[[Piece], bool], timeout: float) -> float:
    """Poll ``check`` until it passes; seconds waited. A process that exits fails at once."""
    start = time.monotonic()
    while True:
        for proc in piece.procs:
            if not alive(proc):
                code = exit_code(proc)
                why = f"{proc.role} exited" + (f" with code {code}" if code is not None else "")
                raise PieceFailed(piece.name, why, proc.log)
        try:
            if check(piece):
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not answering yet looks like any client error
            pass
        if time.monotonic() - start > timeout:
            raise PieceFailed(piece.name, f"no healthy answer within {timeout:.0f}s", piece.log)
        time.sleep(0.5)
