"""Sending records at a steady rate: the pacing shared by ``simulate --live`` and ``publish``.

``qis-beam publish`` sends an existing TFRecord log as it is: each record keeps its own event
time as its Kafka timestamp / Pub/Sub attribute. Progress goes to a terminal only, so logs
and CI output stay clean.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from qis_beam.transports import Transport


@dataclasses.dataclass
class PublishStats:
    records: int = 0
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Pacer:
    """Sends at ``rate`` records/s; ``until`` (monotonic) or ``limit`` records end the run."""

    def __init__(self, rate: float | None, duration_s: float | None, clock, sleep):
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self.started = clock()  # for the stats; the schedule starts at self._origin
        self._origin = self.started
        self.until = self.started + duration_s if duration_s is not None else None
        self.sent = 0

    def expired(self) -> bool:
        return self.until is not None and self._clock() >= self.until

    def wait_turn(self) -> bool:
        """Sleep until the next record is due; False once the duration is over."""
        if self.rate:
            due = self._origin + self.sent / self.rate
            delay = due - self._clock()
            if delay > 0:
                if self.until is not None and due >= self.until:
                    return False
                self._sleep(delay)
        return not self.expired()

    def behind_s(self) -> float:
        if not self.rate:
            return 0.0
        return self._clock() - (self._origin + self.sent / self.rate)

    def rebase(self) -> None:
        """Forget a backlog: the next record is due now."""
        if self.rate:
            self._origin = self._clock() - self.sent / self.rate


def publish_records(
    records: Iterable[bytes],
    transport: Transport,
    rate: float | None = None,
    progress: Callable[[PublishStats], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishStats:
    """Send records as they are (each keeps its own event time), at ``rate``/s or at once."""
    pacer = Pacer(rate, None, clock, sleep)
    try:
        for record in records:
            pacer.wait_turn()
            transport.publish(record)
            pacer.sent += 1
            if progress is not None and pacer.sent % 1000 == 0:
                progress(PublishStats(pacer.sent, clock() - pacer.started))
    finally:
        transport.flush()
    return PublishStats(pacer.sent, clock() - pacer.started)


def log_records(paths: Iterable[str]) -> Iterator[bytes]:
    """Records of TFRecord logs in path order. A file's torn tail is sent as one record, so
    the stream dead-letters it as ``undecodable`` just as a backfill of the file does."""
    from qis_beam.tfrecords import read_file, split_records

    for path in paths:
        records, error = split_records(read_file(path))
        yield from records
        if error is not None:
            yield error.rest


def progress_printer(label: str) -> Callable[[PublishStats], None] | None:
    """Progress on a terminal only: logs and CI output stay clean."""
    if not sys.stderr.isatty():
        return None

    def show(stats: PublishStats) -> None:
        print(
            f"\r  {label} {stats.records} records ({stats.rate:.0f}/s)",
            end="",
            file=sys.stderr,
            flush=True,
        )

    return show


def end_progress(progress) -> None:
    if progress is not None:
        print(file=sys.stderr)


def publish_command(paths: list[str], args) -> int:
    """``qis-beam publish --input GLOB --to URL [--rate R]``."""
    from qis_beam.transports import TransportError, open_transport

    progress = progress_printer("published")
    try:
        with open_transport(args.to) as transport:
            stats = publish_records(log_records(paths), transport, args.rate, progress)
    except TransportError as error:
        end_progress(progress)
        print(f"qis-beam publish: {error}", file=sys.stderr)
        return 1
    end_progress(progress)
    print(
        f"published {stats.records} records from {len(paths)} files to {args.to} "
        f"in {stats.elapsed_s:.1f}s ({stats.rate:.0f}/s)"
    )
    return 0
