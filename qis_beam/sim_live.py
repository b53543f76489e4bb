"""``qis-beam simulate --live`` and ``qis-beam publish``: a swarm on the wall clock.

The live swarm is :mod:`qis_beam.simulate`'s swarm (same seed -> same node keys, problems,
approaches and hidden truth; same duplicate, conflicting, malformed and late fractions),
but each record's times are set from the moment it is sent: a record scheduled at wall time
``t`` carries ``event_time = t - delay`` and ``emit_time = t - (delay - network)``, where
``delay`` is the simulator's drawn network + collector delay. Most packets are therefore
about a second old when sent; the late edge nodes' packets are 1-6 hours old, as when such a
node reconnects. Event times follow the clock, so a long run never looks idle to the
pipeline's all-time state (state TTL) or dedupe horizon.

Records are drawn in segments of ~``SEGMENT_SECONDS`` of traffic (one swarm, one random
stream), so memory stays small however long the run. Within a segment the order is random
except that a re-sent copy always comes after its original; records are sent at a steady
``rate``, sleeping between them. When the sender cannot keep up, the schedule is re-based at
the next segment instead of sending a burst.

``publish`` sends an existing TFRecord log as it is: each record keeps its own event time as
its Kafka timestamp / Pub/Sub attribute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from qis_beam import simulate as sim
from qis_beam.transports import Transport
from qis_beam.validation import INGEST_REASONS

SEGMENT_SECONDS = 10.0
MIN_SEGMENT_PACKETS = 200
# Bounds the up-front draw at high rates (a segment's copies and malformed records are spread
# over it, so a run cut short mid-segment still has its share of them).
MAX_SEGMENT_PACKETS = 20_000


@dataclasses.dataclass
class PublishStats:
    records: int = 0
    elapsed_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Pacer:
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


@dataclasses.dataclass
class _Segment:
    records: Iterator[tuple[bytes, dict | None]]
    kinds: np.ndarray  # per record in order: 0 valid, 1 exact replay, 2 conflicting, 3 malformed
    late: np.ndarray  # per record in order: a late edge node's valid packet
    address: np.ndarray  # per record in order: address index
    node: np.ndarray


def _segment(
    rng: np.random.Generator,
    config: sim.SwarmConfig,
    swarm,
    packets: int,
    first_due_ms: int,
    rate: float,
) -> _Segment:
    """Draw ``packets`` valid packets (plus copies and malformed records) sent from
    ``first_due_ms`` on at ``rate``/s, with times set from their send slots."""
    seg_config = dataclasses.replace(config, packets=packets)
    total_rows = packets + round(config.malformed_fraction * packets)
    records_estimate = total_rows + round(config.duplicate_fraction * packets)
    seg_config = dataclasses.replace(
        seg_config, span_ms=max(1, round(1000 * records_estimate / rate))
    )
    rows = sim._draw_rows(rng, seg_config, swarm, total_rows)
    valid_rows = np.setdiff1d(np.arange(total_rows), rows.malformed)
    resends = sim._draw_resends(rng, seg_config, swarm, rows, valid_rows)
    delay_event = rows.arrival - rows.event  # what the batch simulator drew: kept
    delay_emit = rows.arrival - rows.emit

    # Live order: originals uniformly over the segment (their drawn event times), copies
    # somewhere after their original.
    span_end = seg_config.start_ms + seg_config.span_ms
    arrival = rows.event.astype(np.float64)

    def after(sources: np.ndarray) -> np.ndarray:
        start = arrival[sources]
        return start + rng.uniform(0.0, 1.0, sources.size) * np.maximum(span_end - start, 0)

    copies = np.concatenate([after(resends.exact_sources), after(resends.conflict_sources)])
    everything = np.concatenate([arrival, copies])
    order = np.lexsort((np.arange(everything.size), everything))

    # Send slot of each record -> its times.
    slot_ms = first_due_ms + np.rint(np.arange(order.size) * 1000.0 / rate).astype(np.int64)
    n_rows, n_exact = rows.address.size, resends.exact_sources.size
    due = np.empty(order.size, dtype=np.int64)
    due[order] = slot_ms
    rows.event = due[:n_rows] - delay_event
    rows.emit = due[:n_rows] - delay_emit
    rows.arrival = due[:n_rows]
    # A changed resend's emit time: when it is sent, not up to 30 min after its original.
    conflict_due = due[n_rows + n_exact :]
    resends.resend_after = np.maximum(1, conflict_due - rows.emit[resends.conflict_sources])

    kind = np.zeros(everything.size, dtype=np.int8)
    kind[n_rows : n_rows + n_exact] = 1
    kind[n_rows + n_exact :] = 2
    kind[rows.malformed] = 3
    late = np.zeros(everything.size, dtype=bool)
    late[rows.late] = True
    source_row = np.concatenate(
        [np.arange(n_rows), resends.exact_sources, resends.conflict_sources]
    )
    records = sim._records_in_log_order(seg_config, swarm, rows, resends, order)
    return _Segment(
        records,
        kind[order],
        late[order],
        rows.address[source_row[order]],
        rows.node[source_row[order]],
    )


@dataclasses.dataclass
class LiveReport:
    to: str
    stats: PublishStats
    counts: sim.SimulationReport
    files: list[str]


def _write_nodes(out_dir: str, config: sim.SwarmConfig, swarm) -> str:
    path = os.path.join(out_dir, "nodes.txt")
    with open(path, "w", encoding="ascii") as f:
        f.write(
            f"# qis-beam node registry: {config.nodes} Ed25519 public keys (hex), one per line\n"
            f"# simulated live swarm, seed {config.seed}\n"
        )
        f.writelines(key.public_key.hex() + "\n" for key in swarm.keys)
    return path


def _write_truth(out_dir: str, config, swarm, report, n_packets, pairs, stats, to) -> str:
    addresses = {}
    for a, address in enumerate(swarm.addresses):
        effects = dict(zip(swarm.approaches[a], swarm.effects[a].tolist(), strict=True))
        addresses[address.hex()] = {
            "template_id": swarm.template_ids[a],
            "context": swarm.contexts[a],
            "best_approach": swarm.approaches[a][int(np.argmax(swarm.effects[a]))],
            "effects": effects,
            "n_packets": int(n_packets[a]),
            "n_nodes": len({node for address_index, node in pairs if address_index == a}),
        }
    truth = {
        "seed": config.seed,
        "live": {"to": to, "records": stats.records, "seconds": round(stats.elapsed_s, 3)},
        "config": dataclasses.asdict(config),
        "addresses": addresses,
        "counts": report.counts(),
        "unregistered_public_keys": [k.public_key.hex() for k in swarm.unregistered],
    }
    path = os.path.join(out_dir, "truth.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def run_live(
    config: sim.SwarmConfig,
    transport: Transport,
    rate: float,
    *,
    duration_s: float | None = None,
    packets: int | None = None,
    out_dir: str | None = None,
    progress: Callable[[PublishStats], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> LiveReport:
    """Send a live swarm until ``duration_s`` passed or ``packets`` valid packets were sent
    (forever if neither; Ctrl-C ends it cleanly). ``out_dir`` gets nodes.txt (the registry
    for ``run --node-registry``) at the start and truth.json with what was sent at the end."""
    rng = np.random.Generator(np.random.PCG64(config.seed))
    swarm = sim._draw_swarm(rng, config)
    files = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        files.append(_write_nodes(out_dir, config, swarm))
    per_record = 1.0 + config.duplicate_fraction + config.malformed_fraction
    segment_packets = min(
        MAX_SEGMENT_PACKETS,
        max(MIN_SEGMENT_PACKETS, round(rate * SEGMENT_SECONDS / per_record)),
    )
    counts = {"valid": 0, "duplicates": 0, "conflicting": 0, "late": 0}
    malformed = dict.fromkeys(INGEST_REASONS, 0)
    n_packets = np.zeros(config.addresses, dtype=np.int64)
    pairs: set[tuple[int, int]] = set()
    pacer = _Pacer(rate, duration_s, clock, sleep)
    sent_packets = 0
    try:
        while not pacer.expired() and (packets is None or sent_packets < packets):
            want = (
                segment_packets if packets is None else min(segment_packets, packets - sent_packets)
            )
            if pacer.behind_s() > 1.0:
                pacer.rebase()
            first_due = wall_ms() + round(1000 * max(0.0, -pacer.behind_s()))
            segment = _segment(rng, config, swarm, want, first_due, rate)
            for i, (record, malformation) in enumerate(segment.records):
                if not pacer.wait_turn():
                    break
                transport.publish(record)
                pacer.sent += 1
                kind = int(segment.kinds[i])
                if malformation is not None:
                    malformed[malformation["reason"]] += 1
                elif kind == 0:
                    counts["valid"] += 1
                    counts["late"] += int(segment.late[i])
                    n_packets[segment.address[i]] += 1
                    pairs.add((int(segment.address[i]), int(segment.node[i])))
                else:
                    counts["duplicates" if kind == 1 else "conflicting"] += 1
                if progress is not None and pacer.sent % 1000 == 0:
                    progress(PublishStats(pacer.sent, clock() - pacer.started))
            sent_packets += want
    except KeyboardInterrupt:
        pass  # a live run is ended by Ctrl-C: flush what was sent and report it
    finally:
        transport.flush()
    stats = PublishStats(pacer.sent, clock() - pacer.started)
    report = sim.SimulationReport(
        out_dir=out_dir or "",
        files=list(files),
        records=pacer.sent,
        valid=counts["valid"],
        duplicates=counts["duplicates"],
        malformed_by_reason=malformed,
        late=counts["late"],
        conflicting=counts["conflicting"],
    )
    if out_dir:
        to = str(getattr(transport, "url", ""))
        files.append(_write_truth(out_dir, config, swarm, report, n_packets, pairs, stats, to))
    return LiveReport(str(getattr(transport, "url", "")), stats, report, files)


def publish_records(
    records: Iterable[bytes],
    transport: Transport,
    rate: float | None = None,
    progress: Callable[[PublishStats], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PublishStats:
    """Send records as they are (each keeps its own event time), at ``rate``/s or at once."""
    pacer = _Pacer(rate, None, clock, sleep)
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


# --- the two commands (qis_beam/cli.py parses the arguments) ---------------------------------


def _progress_printer(label: str) -> Callable[[PublishStats], None] | None:
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


def _end_progress(progress) -> None:
    if progress is not None:
        print(file=sys.stderr)


def simulate_live_command(config: sim.SwarmConfig, args) -> int:
    """``qis-beam simulate --live --rate R --to URL [--duration D | --packets N] [--out DIR]``."""
    from qis_beam.transports import TransportError, open_transport

    progress = _progress_printer("sent")
    try:
        with open_transport(args.to) as transport:
            report = run_live(
                config,
                transport,
                args.rate,
                duration_s=args.duration / 1000 if args.duration else None,
                packets=args.packets,
                out_dir=args.out,
                progress=progress,
            )
    except TransportError as error:
        _end_progress(progress)
        print(f"qis-beam simulate: {error}", file=sys.stderr)
        return 1
    _end_progress(progress)
    counts = report.counts
    print(
        f"sent {counts.records} records ({counts.valid} valid, {counts.duplicates} duplicates, "
        f"{counts.conflicting} conflicting, {counts.malformed} malformed, {counts.late} late) "
        f"to {report.to} in {report.stats.elapsed_s:.1f}s ({report.stats.rate:.0f}/s)"
    )
    for path in report.files:
        print(f"  {path}")
    return 0


def publish_command(paths: list[str], args) -> int:
    """``qis-beam publish --input GLOB --to URL [--rate R]``."""
    from qis_beam.transports import TransportError, open_transport

    progress = _progress_printer("published")
    try:
        with open_transport(args.to) as transport:
            stats = publish_records(log_records(paths), transport, args.rate, progress)
    except TransportError as error:
        _end_progress(progress)
        print(f"qis-beam publish: {error}", file=sys.stderr)
        return 1
    _end_progress(progress)
    print(
        f"published {stats.records} records from {len(paths)} files to {args.to} "
        f"in {stats.elapsed_s:.1f}s ({stats.rate:.0f}/s)"
    )
    return 0
