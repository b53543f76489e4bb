"""Progress of long work on a terminal: a process-local hook and its tqdm display.

Transforms report work with :func:`advance`; it does nothing unless a launcher in this
process opened a :class:`Progress` (the CLI does, on a terminal and without ``--quiet``). On
remote workers, or in an SDK harness in another process, nothing is installed, so reporting
costs one global read and the pipeline's results never depend on it. Logs and pipes stay
clean: the display is off when stderr is not a TTY.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

# TFRecord framing around each record: length (8) + its CRC (4) + the data's CRC (4).
FRAME_BYTES = 16

_sink: Callable[[int, int], None] | None = None


def advance(records: int, nbytes: int = 0) -> None:
    """Report ``records`` read (and ``nbytes`` of input) to this process's display, if any."""
    sink = _sink
    if sink is not None:
        sink(records, nbytes)


def advance_batch(records: Sequence[bytes]) -> int:
    """Report a batch of framed records; returns the bytes reported (0 with no display)."""
    if _sink is None:
        return 0
    nbytes = sum(map(len, records)) + FRAME_BYTES * len(records)
    advance(len(records), nbytes)
    return nbytes


def active() -> bool:
    return _sink is not None


def wanted(quiet: bool, stream: IO | None = None) -> bool:
    """Progress is shown on a terminal only, and never with ``--quiet``."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


class Progress:
    """A bar on stderr for one stage at a time: records (and bytes of a known total), rate,
    elapsed. Installs the :func:`advance` hook while open; a disabled one does nothing."""

    def __init__(self, enabled: bool, refresh_s: float = 0.5):
        self.enabled = enabled
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._bar = None
        self._records = 0
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        global _sink
        if self.enabled:
            _sink = self._advance
            self._thread = threading.Thread(target=self._tick, name="qis-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _sink
        if not self.enabled:
            return
        _sink = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._close()

    def stage(self, desc: str, total: int | None = None, unit: str = "B") -> None:
        """Start a new bar: ``unit="B"`` counts bytes of ``total`` (records shown beside),
        any other unit counts records; ``unit=""`` shows only the stage and its elapsed time."""
        if not self.enabled:
            return
        from tqdm import tqdm

        shape = {"bar_format": "{desc} [{elapsed}]"} if not unit else {}

        with self._lock:
            self._close()
            self._records = 0
            self._started = time.monotonic()
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                **shape,
            )

    def _advance(self, records: int, nbytes: int) -> None:
        with self._lock:
            if self._bar is None:
                return
            self._records += records
            bytes_bar = self._bar.unit == "B"
            self._bar.update(nbytes if bytes_bar else records)
            if bytes_bar:
                self._bar.set_postfix_str(self._records_text(), refresh=False)

    def _records_text(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return f"{self._records:,} records, {self._records / elapsed:,.0f}/s"

    def _tick(self) -> None:
        # Elapsed time keeps moving while no record is read (e.g. after the read pass).
        while not self._stop.wait(self._refresh_s):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
