"""Plan a replay: packet logs -> arrival-ordered record batches and watermark steps.

Beam-free, so the plan can be tested on its own. Records are ordered by emit time (the
order a live transport would deliver them; records whose emit time cannot be read keep
their place after the previous record), stamped with their event time, and grouped into
steps of at most ``step_ms`` of emit time; after each step the watermark moves to the
latest emit time seen minus ``watermark_delay_ms``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from qis_beam.tfrecords import read_file, split_records
from qis_beam.wire import WireError, corrupt_tail, corrupt_tail_source, decode_record

# Runners replay refuses, and why (measured on Beam 2.77 with Prism v2.77.0; README "Replay").
REFUSED_RUNNERS = {
    "prismrunner": (
        "Prism lets too-late packets reopen windows that have already closed and labels late "
        "panes EARLY (apache/beam#31438), so final panes and pane timings would be wrong"
    ),
    # A bare DirectRunner runs a streaming pipeline on Prism when it can download it.
    "directrunner": "name the runner: --runner BundleBasedDirectRunner (the default)",
}


class UnsupportedReplayRunner(ValueError):
    """A runner that would replay with other semantics than spec section 6."""


def check_replay_runner(runner: str) -> str:
    """The runner's short name, or :class:`UnsupportedReplayRunner` with the reason."""
    name = runner.rsplit(".", 1)[-1]
    reason = REFUSED_RUNNERS.get(name.lower()) or REFUSED_RUNNERS.get(f"{name.lower()}runner")
    if reason:
        raise UnsupportedReplayRunner(f"--runner {name} is not supported by replay: {reason}")
    return name


@dataclasses.dataclass
class ReplayStep:
    elements: list[tuple[bytes, str, int]]  # (record, source, timestamp ms)
    watermark_ms: int | None  # None: the watermark does not move after this step


@dataclasses.dataclass
class ReplayPlan:
    steps: list[ReplayStep]
    records: int
    first_emit_ms: int | None
    last_emit_ms: int | None
    last_event_ms: int | None


def _times(record: bytes) -> tuple[int, int] | None:
    """(emit_ms, event_ms) of a record, or None when it does not parse."""
    try:
        _, packet = decode_record(record)
    except WireError:  # unparsable records are validated (and dead-lettered) later
        return None
    return packet.emit_time_ms, packet.event_time_ms


def _arrivals(paths: Iterable[str]) -> list[tuple[int, int, bytes, str, int]]:
    """(arrival_ms, file order, record, source, timestamp_ms) for every record."""
    arrivals = []
    order = 0
    last_emit = 0
    for path in paths:
        data = read_file(path)
        records, corrupt = split_records(data)
        sources = [path] * len(records)
        if corrupt is not None:
            # The unframable tail travels as one element that validation dead-letters by
            # the corrupt-tail rule of qis_beam.wire, as the backfill's reader does.
            detail, tail = corrupt_tail(corrupt, len(data))
            records.append(tail)
            sources.append(corrupt_tail_source(path, detail))
        for record, source in zip(records, sources, strict=True):
            times = _times(record)
            if times and times[0] > 0:
                emit_ms, event_ms = times
                last_emit = emit_ms
            else:
                emit_ms = event_ms = last_emit
            timestamp = event_ms if event_ms > 0 else emit_ms
            arrivals.append((emit_ms, order, record, source, timestamp))
            order += 1
    arrivals.sort(key=lambda a: (a[0], a[1]))
    return arrivals


def plan_replay(paths: Iterable[str], watermark_delay_ms: int, step_ms: int) -> ReplayPlan:
    arrivals = _arrivals(sorted(paths))
    steps: list[ReplayStep] = []
    current: list[tuple[bytes, str, int]] = []
    step_end = None
    watermark = None
    last_event = None
    for emit_ms, _, record, source, timestamp in arrivals:
        if step_end is not None and emit_ms >= step_end and current:
            target = step_end - watermark_delay_ms
            move = watermark is None or target > watermark
            watermark = target if move else watermark
            steps.append(ReplayStep(current, target if move else None))
            current = []
        if step_end is None or emit_ms >= step_end:
            step_end = emit_ms - emit_ms % step_ms + step_ms
        current.append((record, source, timestamp))
        last_event = timestamp if last_event is None else max(last_event, timestamp)
    if current:
        steps.append(ReplayStep(current, None))
    return ReplayPlan(
        steps=steps,
        records=len(arrivals),
        first_emit_ms=arrivals[0][0] if arrivals else None,
        last_emit_ms=arrivals[-1][0] if arrivals else None,
        last_event_ms=last_event,
    )
