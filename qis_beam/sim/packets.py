"""The packets of a swarm: per-record draws, re-sent copies, and the records in log order.

All per-packet numbers are drawn vectorised up front (:func:`draw_rows`,
:func:`draw_resends`), including the arrival time that fixes the write order; records are
then built and sealed by the real emitter (:func:`qis_beam.emitter.build_packet` /
:func:`~qis_beam.emitter.seal`) one chunk at a time in that order
(:func:`records_in_log_order`), so memory holds only the few records that are later re-sent.

Re-sent copies: 90 % of them are exact replays (``duplicates``), 10 % (:data:`CONFLICT_SHARE`)
conflicting resends (same packet_id, changed delta and emit time, correctly signed: dead
letter ``conflicting_duplicate``). A packet is re-sent at most once, always after the
original, so batch (smallest payload kept) and streaming (first arrival kept) count the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from qis_beam.emitter import OutcomeType, build_packet, seal
from qis_beam.sim.defects import extra_defect, malformed_record, variant_name
from qis_beam.sim.swarm import NOISE_MEDIAN, UNREGISTERED_NODES, Swarm, SwarmConfig
from qis_beam.sim.templates import SPECS
from qis_beam.wire import HOUR_MS, NODE_ID_BYTES, PACKET_ID_BYTES, OutcomePacket

# Share of re-sent copies that changed (conflicting_duplicate); the rest are exact replays.
CONFLICT_SHARE = 0.1
# Outcome type from the measured delta (positive = better) and the evaluation size.
RESOLVED_DELTA = 0.02
PARTIAL_DELTA = 0.005
MIN_SAMPLES = 30  # fewer evaluations than this: inconclusive (OPEN)
# A median-noise node's noise is NOISE_MEDIAN on REFERENCE_SAMPLES evaluations.
REFERENCE_SAMPLES = 500
CONFIDENCE_HALF_SAMPLES = 200  # a median-noise node is half confident at this many evaluations
CHUNK = 10_000  # records built per chunk of columns


def outcome_types(delta: np.ndarray, sample_count: np.ndarray) -> np.ndarray:
    """How a node reports what it measured: clear gain, small gain, loss or inconclusive."""
    inconclusive = (np.abs(delta) <= PARTIAL_DELTA) | (sample_count < MIN_SAMPLES)
    return np.select(
        [inconclusive, delta > RESOLVED_DELTA, delta > PARTIAL_DELTA],
        [int(OutcomeType.OPEN), int(OutcomeType.RESOLVED), int(OutcomeType.PARTIAL)],
        default=int(OutcomeType.CONTRADICTED),
    )


@dataclasses.dataclass
class Rows:
    """Per-packet draws for every original record (valid and malformed), vectorised."""

    address: np.ndarray
    node: np.ndarray
    approach: np.ndarray
    outcome_type: np.ndarray
    delta: np.ndarray
    confidence: np.ndarray
    sample_count: np.ndarray
    event: np.ndarray
    emit: np.ndarray
    metrics: tuple[np.ndarray, np.ndarray, np.ndarray]
    arrival: np.ndarray  # when the collector wrote it: fixes the log order
    packet_ids: bytes
    late: np.ndarray  # row indices (valid rows only)
    malformed: np.ndarray  # sorted row indices
    # Per malformed record: which other registered node and which unregistered key it may
    # use, and a random node_id.
    other_node: np.ndarray
    unregistered: np.ndarray
    random_ids: bytes

    def columns(self, rows: np.ndarray) -> tuple[list, ...]:
        """The packet fields of ``rows`` as Python lists (one chunk at a time: memory, speed)."""
        fields = (
            self.address,
            self.node,
            self.approach,
            self.outcome_type,
            self.delta,
            self.confidence,
            self.sample_count,
            self.event,
            self.emit,
            *self.metrics,
        )
        return tuple(f[rows].tolist() for f in fields)


def draw_rows(rng: np.random.Generator, config: SwarmConfig, swarm: Swarm, total: int) -> Rows:
    """``total`` original records: which node measured what for which address, and when."""
    counts = rng.multinomial(total, swarm.popularity)
    address = np.repeat(np.arange(config.addresses), counts)
    node = np.empty(total, dtype=np.int64)
    start = 0
    for a, count in enumerate(counts):
        members = swarm.node_sets[a]
        weights = swarm.activity[members] / swarm.activity[members].sum()
        node[start : start + count] = rng.choice(members, size=count, p=weights)
        start += count
    approach = rng.integers(0, config.approaches, total)
    sample_count = np.maximum(
        1, np.rint(swarm.sample_scale[node] * rng.lognormal(0.0, 0.5, total))
    ).astype(np.int64)
    sample_count = np.minimum(sample_count, 2**31)
    noise = np.clip(np.sqrt(REFERENCE_SAMPLES / sample_count), 0.25, 4.0) * swarm.noise_sd[node]
    delta = np.round(
        swarm.effects[address, approach] + swarm.bias[node] + noise * rng.standard_normal(total), 6
    )
    # Confidence grows with the evaluation size, slower for noisy nodes, times the node's habit.
    half = CONFIDENCE_HALF_SAMPLES * (swarm.noise_sd[node] / NOISE_MEDIAN) ** 2
    confidence = np.round(swarm.habit[node] * sample_count / (sample_count + half), 4)
    event = config.start_ms + rng.integers(0, config.span_ms, total)
    network = np.clip(np.rint(rng.lognormal(math.log(300.0), 1.2, total)), 5, 30_000)
    n_malformed = round(config.malformed_fraction * config.packets)
    malformed = np.sort(rng.choice(total, n_malformed, replace=False))
    valid = np.setdiff1d(np.arange(total), malformed)
    late = rng.choice(valid, round(config.late_fraction * config.packets), replace=False)
    network[late] = rng.integers(HOUR_MS, 6 * HOUR_MS + 1, late.size)  # reconnecting edge nodes
    emit = event + network.astype(np.int64)
    arrival = emit + np.clip(np.rint(rng.lognormal(math.log(250.0), 1.3, total)), 1, 600_000)

    base = swarm.baseline[address]
    speed = swarm.speed[node] * rng.lognormal(0.0, 0.1, total)
    metrics = (np.zeros(total), np.zeros(total), np.zeros(total))
    template_of_address = np.array(swarm.template_ids)[address] if total else np.array([])
    for template_id in sorted(set(swarm.template_ids)):
        rows = template_of_address == template_id
        values = SPECS[template_id].metrics(base[rows], delta[rows], speed[rows])
        for column, value in zip(metrics, values, strict=True):
            column[rows] = np.round(value, 6)
    return Rows(
        address, node, approach, outcome_types(delta, sample_count), delta, confidence,
        sample_count, event, emit, metrics, arrival.astype(np.int64),
        rng.bytes(PACKET_ID_BYTES * total), late, malformed,
        other_node=rng.integers(0, max(config.nodes - 1, 1), n_malformed),
        unregistered=rng.integers(0, UNREGISTERED_NODES, n_malformed),
        random_ids=rng.bytes(NODE_ID_BYTES * n_malformed),
    )  # fmt: skip


@dataclasses.dataclass
class Resends:
    """Re-sent copies of valid packets: each packet at most once, always after the original."""

    exact_sources: np.ndarray  # rows replayed byte for byte
    exact_arrival: np.ndarray
    conflict_sources: np.ndarray  # rows resent with a changed payload
    resend_after: np.ndarray  # ms between the original and the changed copy
    conflict_delta: np.ndarray
    conflict_type: np.ndarray


def draw_resends(
    rng: np.random.Generator, config: SwarmConfig, swarm: Swarm, rows: Rows, valid_rows
) -> Resends:
    """``duplicate_fraction`` x packets copies of distinct valid rows (see module)."""
    resent = round(config.duplicate_fraction * config.packets)
    n_conflicting = round(CONFLICT_SHARE * resent)
    n_exact = resent - n_conflicting
    sources = rng.choice(valid_rows, resent, replace=False)
    exact, conflict = sources[:n_exact], sources[n_exact:]
    exact_arrival = rows.arrival[exact] + rng.integers(1_000, 900_001, n_exact)  # ack timeouts
    resend_after = rng.integers(60_000, 1_800_001, n_conflicting)
    delta = np.round(
        rows.delta[conflict]
        + 0.5 * swarm.noise_sd[rows.node[conflict]] * rng.standard_normal(n_conflicting),
        6,
    )
    delta[delta == rows.delta[conflict]] += 0.001
    outcome = outcome_types(delta, rows.sample_count[conflict])
    return Resends(exact, exact_arrival, conflict, resend_after, delta, outcome)


def records_in_log_order(
    config: SwarmConfig, swarm: Swarm, rows: Rows, resends: Resends, order: np.ndarray
) -> Iterator[tuple[bytes, dict | None]]:
    """Each record in log order, with its malformation (reason, also, variant) if malformed.

    ``order`` holds sequence numbers: rows first, then exact replays, then changed resends.
    """
    reasons = config.reasons()
    n_rows, n_exact = rows.address.size, resends.exact_sources.size
    malformed_index = {int(r): m for m, r in enumerate(rows.malformed)}
    replayed = set(resends.exact_sources.tolist())
    changed = set(resends.conflict_sources.tolist())
    kept_records: dict[int, bytes] = {}
    kept_packets: dict[int, OutcomePacket] = {}
    per_address = [
        (address, t, approaches, SPECS[t].metric_names)
        for address, t, approaches in zip(
            swarm.addresses, swarm.template_ids, swarm.approaches, strict=True
        )
    ]
    keys, signed = swarm.keys, config.signed

    for start in range(0, order.size, CHUNK):
        seqs = order[start : start + CHUNK]
        # Resent copies read some row's fields and ignore them.
        columns = rows.columns(np.minimum(seqs, max(n_rows - 1, 0)))
        address, node, approach, outcome, delta, confidence, samples, event, emit = columns[:9]
        first, second, third = columns[9:]
        for i, seq in enumerate(seqs.tolist()):
            if seq >= n_rows + n_exact:  # a resend with a changed payload
                j = seq - n_rows - n_exact
                source = int(resends.conflict_sources[j])
                packet = kept_packets.pop(source)
                packet.outcome_delta = float(resends.conflict_delta[j])
                packet.outcome_type = int(resends.conflict_type[j])
                packet.emit_time_ms += int(resends.resend_after[j])
                key = keys[int(rows.node[source])]
                yield seal(key if signed else None, packet, public_key=key.public_key), None
                continue
            if seq >= n_rows:  # an exact replay
                yield kept_records.pop(int(resends.exact_sources[seq - n_rows])), None
                continue
            address_bytes, template_id, approaches, names = per_address[address[i]]
            key = keys[node[i]]
            m = malformed_index.get(seq)
            if m is not None:
                reason, cycle = reasons[m % len(reasons)], m // len(reasons)
                extra = extra_defect(reasons, reason) if cycle % 2 else None
                defects = (reason, extra) if extra else (reason,)
                if "unknown_node" in defects:
                    key = swarm.unregistered[int(rows.unregistered[m])]
            packet = build_packet(
                key=key,
                address=address_bytes,
                template_id=template_id,
                approach_id=approaches[approach[i]],
                outcome_type=outcome[i],
                outcome_delta=delta[i],
                confidence=confidence[i],
                sample_count=samples[i],
                event_time_ms=event[i],
                emit_time_ms=emit[i],
                metrics={names[0]: first[i], names[1]: second[i], names[2]: third[i]},
                packet_id=rows.packet_ids[PACKET_ID_BYTES * seq : PACKET_ID_BYTES * (seq + 1)],
            )
            if m is None:
                record = seal(key if signed else None, packet, public_key=key.public_key)
                if seq in replayed:
                    kept_records[seq] = record
                if seq in changed:
                    kept_packets[seq] = packet
                yield record, None
                continue
            other = None
            if config.nodes > 1:
                other = keys[(node[i] + 1 + int(rows.other_node[m])) % config.nodes]
            random_id = rows.random_ids[NODE_ID_BYTES * m : NODE_ID_BYTES * (m + 1)]
            record = malformed_record(packet, key, other, random_id, defects, cycle, signed)
            variant = variant_name(reason, cycle)
            yield record, {"reason": reason, "also": extra, "variant": variant}
