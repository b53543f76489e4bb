"""``qis-beam simulate --live``: a swarm on the wall clock, sent onto a transport.

The live swarm is :mod:`qis_beam.sim.swarm`'s swarm (same seed -> same node keys, problems,
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
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from qis_beam.sim.files import SimulationReport
from qis_beam.sim.packets import draw_resends, draw_rows, records_in_log_order
from qis_beam.sim.sending import Pacer, PublishStats, end_progress, progress_printer
from qis_beam.sim.swarm import Swarm, SwarmConfig, draw_swarm, write_registry, write_truth
from qis_beam.transports import Transport
from qis_beam.validation import INGEST_REASONS

SEGMENT_SECONDS = 10.0
MIN_SEGMENT_PACKETS = 200
# Bounds the up-front draw at high rates (a segment's copies and malformed records are spread
# over it, so a run cut short mid-segment still has its share of them).
MAX_SEGMENT_PACKETS = 20_000


@dataclasses.dataclass
class _Segment:
    records: Iterator[tuple[bytes, dict | None]]
    kinds: np.ndarray  # per record in order: 0 valid, 1 exact replay, 2 conflicting, 3 malformed
    late: np.ndarray  # per record in order: a late edge node's valid packet
    address: np.ndarray  # per record in order: address index
    node: np.ndarray


def _segment(
    rng: np.random.Generator,
    config: SwarmConfig,
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
    rows = draw_rows(rng, seg_config, swarm, total_rows)
    valid_rows = np.setdiff1d(np.arange(total_rows), rows.malformed)
    resends = draw_resends(rng, seg_config, swarm, rows, valid_rows)
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
    records = records_in_log_order(seg_config, swarm, rows, resends, order)
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
    counts: SimulationReport
    files: list[str]


def _write_truth(out_dir: str, config, swarm: Swarm, report, n_packets, pairs, stats, to) -> str:
    n_nodes = [len({node for index, node in pairs if index == a}) for a in range(config.addresses)]
    truth = {
        "seed": config.seed,
        "live": {"to": to, "records": stats.records, "seconds": round(stats.elapsed_s, 3)},
        "config": dataclasses.asdict(config),
        "addresses": swarm.address_truth(n_packets, n_nodes),
        "counts": report.counts(),
        "unregistered_public_keys": [k.public_key.hex() for k in swarm.unregistered],
    }
    path = os.path.join(out_dir, "truth.json")
    write_truth(path, truth)
    return path


def run_live(
    config: SwarmConfig,
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
    swarm = draw_swarm(rng, config)
    files = []
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        files.append(os.path.join(out_dir, "nodes.txt"))
        write_registry(files[-1], swarm.keys, f"simulated live swarm, seed {config.seed}")
    per_record = 1.0 + config.duplicate_fraction + config.malformed_fraction
    segment_packets = min(
        MAX_SEGMENT_PACKETS,
        max(MIN_SEGMENT_PACKETS, round(rate * SEGMENT_SECONDS / per_record)),
    )
    counts = {"valid": 0, "duplicates": 0, "conflicting": 0, "late": 0}
    malformed = dict.fromkeys(INGEST_REASONS, 0)
    n_packets = np.zeros(config.addresses, dtype=np.int64)
    pairs: set[tuple[int, int]] = set()
    pacer = Pacer(rate, duration_s, clock, sleep)
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
    report = SimulationReport(
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


def simulate_live_command(config: SwarmConfig, args) -> int:
    """``qis-beam simulate --live --rate R --to URL [--duration D | --packets N] [--out DIR]``."""
    from qis_beam.transports import TransportError, open_transport

    progress = progress_printer("sent")
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
        end_progress(progress)
        print(f"qis-beam simulate: {error}", file=sys.stderr)
        return 1
    end_progress(progress)
    counts = report.counts
    print(
        f"sent {counts.records} records ({counts.valid} valid, {counts.duplicates} duplicates, "
        f"{counts.conflicting} conflicting, {counts.malformed} malformed, {counts.late} late) "
        f"to {report.to} in {report.stats.elapsed_s:.1f}s ({report.stats.rate:.0f}/s)"
    )
    for path in report.files:
        print(f"  {path}")
    return 0
