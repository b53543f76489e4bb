"""The synthetic swarm: reproducible, believable, and exactly as broken as truth.json says.

No test here runs a pipeline: records are checked with :func:`qis_beam.validation.validate`
directly (the backfill against truth.json is tests/test_cli.py's, on the FnApiRunner).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re

import numpy as np
import pytest

from qis_beam.address import TEMPLATES, semantic_address
from qis_beam.beam_internals import tfrecord_util
from qis_beam.emitter import OutcomeType
from qis_beam.signing import load_registry, node_id_for
from qis_beam.sim import SimulationReport, SwarmConfig, simulate
from qis_beam.sim.defects import FAR_FUTURE_MS
from qis_beam.sim.files import PROGRESS_EVERY
from qis_beam.sim.packets import outcome_types
from qis_beam.sim.swarm import BEST_MARGIN
from qis_beam.sim.templates import MAX_ADDRESSES, MAX_APPROACHES
from qis_beam.validation import (
    DUPLICATE_REASON,
    INGEST_REASONS,
    Accepted,
    Rejection,
    ValidationPolicy,
    validate,
)
from qis_beam.wire import (
    APPROACH_ID_RE,
    HOUR_MS,
    MAX_METRICS,
    OUTCOME_NAMES,
    OUTCOME_SCORES,
    OutcomePacket,
    WireError,
    decode_envelope,
    decode_packet,
)

SMALL = SwarmConfig(
    nodes=40,
    addresses=6,
    approaches=6,
    packets=2000,
    seed=7,
    duplicate_fraction=0.02,
    malformed_fraction=0.01,
    late_fraction=0.05,
    shards=3,
)
TINY = dataclasses.replace(SMALL, packets=300, malformed_fraction=0.03)


@dataclasses.dataclass
class Swarm:
    report: SimulationReport
    config: SwarmConfig
    truth: dict
    registry: frozenset[bytes]
    log: list[tuple[str, int, bytes]]  # (file name, index in file, record) in log order

    def verdicts(self, policy: ValidationPolicy | None = None) -> list:
        policy = policy or ValidationPolicy(registry=self.registry)
        return [validate(record, policy) for _, _, record in self.log]

    def accepted(self) -> list[tuple[int, bytes, OutcomePacket]]:
        """(position in log, payload, packet) of every record validation accepts."""
        return [
            (position, verdict.payload, verdict.packet)
            for position, verdict in enumerate(self.verdicts())
            if isinstance(verdict, Accepted)
        ]


def read_log(report: SimulationReport) -> list[tuple[str, int, bytes]]:
    """Records in log order, read with Beam's own TFRecord reader (framing and CRCs)."""
    log = []
    for path in report.shard_files:
        with open(path, "rb") as handle:
            index = 0
            while (record := tfrecord_util().read_record(handle)) is not None:
                log.append((os.path.basename(path), index, record))
                index += 1
    return log


def run(out_dir, config: SwarmConfig, progress=None) -> Swarm:
    report = simulate(str(out_dir), config, progress=progress)
    with open(os.path.join(out_dir, "truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    registry = load_registry(os.path.join(out_dir, "nodes.txt"))
    return Swarm(report, config, truth, registry, read_log(report))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Swarm:
    return run(tmp_path_factory.mktemp("swarm"), SMALL)


@pytest.fixture(scope="module")
def unsigned_swarm(tmp_path_factory) -> Swarm:
    return run(tmp_path_factory.mktemp("unsigned"), dataclasses.replace(SMALL, signed=False))


def file_bytes(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_truth_json_reproduces_the_run_and_other_seeds_differ(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simulate(str(first), TINY)
    # truth.json's config alone is enough to write the same bytes again.
    config = json.loads((first / "truth.json").read_text())["config"]
    simulate(str(second), SwarmConfig(**config))
    simulate(str(other), dataclasses.replace(TINY, seed=TINY.seed + 1))
    assert file_bytes(first) == file_bytes(second)
    a, c = file_bytes(first), file_bytes(other)
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)


def test_layout_and_registry_format(swarm):
    report, out = swarm.report, swarm.report.out_dir
    # The input glob a backfill is given finds exactly the shards, and name order is log order.
    shards = sorted(glob.glob(report.to_json()["input_glob"]))
    assert shards == report.shard_files and len(shards) == SMALL.shards
    side_files = [os.path.join(out, "nodes.txt"), os.path.join(out, "truth.json")]
    assert report.files == [*shards, *side_files]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(f) for f in report.files)
    assert all(os.path.getsize(path) > 0 for path in report.files)
    assert [name for name, _, _ in swarm.log] == sorted(name for name, _, _ in swarm.log)

    lines = open(os.path.join(out, "nodes.txt"), encoding="ascii").read().splitlines()
    assert lines[0].startswith("#")
    keys = [line for line in lines if not line.startswith("#")]
    assert len(keys) == SMALL.nodes == len(set(keys)) == len(swarm.registry)
    assert all(re.fullmatch(r"[0-9a-f]{64}", key) for key in keys)

    assert swarm.truth["counts"] == swarm.report.counts()
    assert json.loads(json.dumps(swarm.report.to_json()))["records"] == swarm.report.records


def test_stale_shards_of_another_shard_count_are_removed(tmp_path):
    simulate(str(tmp_path), dataclasses.replace(TINY, shards=5))
    report = simulate(str(tmp_path), TINY)
    shards = sorted(n for n in os.listdir(tmp_path) if n.startswith("packets-"))
    assert shards == [os.path.basename(p) for p in report.shard_files]
    assert len(shards) == TINY.shards


def test_counts_match_the_files_and_the_ingestion_equation(swarm):
    report = swarm.report
    assert len(swarm.log) == report.records
    assert report.valid == SMALL.packets
    assert report.duplicates + report.conflicting == round(SMALL.duplicate_fraction * SMALL.packets)
    assert 0 < report.conflicting < report.duplicates  # most re-sent copies are exact replays
    assert report.malformed == round(SMALL.malformed_fraction * SMALL.packets)
    resent = report.duplicates + report.conflicting
    assert report.records == report.valid + resent + report.malformed

    reasons = collections.Counter(v.reason for v in swarm.verdicts() if isinstance(v, Rejection))
    assert reasons == +collections.Counter(report.malformed_by_reason)
    accepted = swarm.accepted()
    assert len(accepted) == report.valid + report.duplicates + report.conflicting
    assert len({packet.packet_id for _, _, packet in accepted}) == report.valid


def summary_of(swarm: Swarm) -> dict:
    """The run summary a pipeline must report for the whole log, worked out here from scratch:
    validate every record with the policy truth.json names, then dedupe by packet_id (the same
    payload again is a duplicate, a changed one a conflicting_duplicate)."""
    named = swarm.truth["validation_policy"]
    assert named["registry"] == "nodes.txt"
    policy = ValidationPolicy(
        registry=swarm.registry,
        allow_unsigned=named["allow_unsigned"],
        max_packet_bytes=named["max_packet_bytes"],
        max_clock_skew_ms=named["max_clock_skew_ms"],
    )
    dead = collections.Counter()
    first_payload: dict[bytes, bytes] = {}
    duplicates = 0
    for verdict in swarm.verdicts(policy):
        if isinstance(verdict, Rejection):
            dead[verdict.reason] += 1
            continue
        seen = first_payload.get(verdict.packet.packet_id)
        if seen is None:
            first_payload[verdict.packet.packet_id] = verdict.payload
        elif seen == verdict.payload:
            duplicates += 1
        else:
            dead[DUPLICATE_REASON] += 1
    return {
        "records_in": len(swarm.log),
        "valid": len(first_payload),
        "duplicates": duplicates,
        "dead_letters": {"total": dead.total(), "by_reason": dict(dead)},
    }


def test_expected_summary_is_what_validation_and_dedupe_of_the_log_give(swarm, unsigned_swarm):
    for run_ in (swarm, unsigned_swarm):
        assert summary_of(run_) == run_.truth["counts"]["expected_summary"]


def test_every_ingestion_reason_is_present_and_classified_as_intended(swarm):
    assert all(swarm.report.malformed_by_reason[r] >= 1 for r in INGEST_REASONS)
    entries = swarm.truth["malformed"]
    assert len(entries) == swarm.report.malformed
    position = {(name, index): p for p, (name, index, _) in enumerate(swarm.log)}
    verdicts = swarm.verdicts()
    for entry in entries:
        verdict = verdicts[position[entry["file"], entry["index"]]]
        assert isinstance(verdict, Rejection), entry
        assert verdict.reason == entry["reason"], (entry, verdict)
    # Multi-defect records: a later check would fail too, the earlier one wins.
    multi = [e for e in entries if e["also"]]
    assert len(multi) >= 5
    assert all(INGEST_REASONS.index(e["also"]) > INGEST_REASONS.index(e["reason"]) for e in multi)


def test_unknown_node_records_are_signed_by_keys_outside_the_registry(swarm):
    unregistered = {bytes.fromhex(k) for k in swarm.truth["unregistered_public_keys"]}
    assert not unregistered & swarm.registry
    records = {(name, index): record for name, index, record in swarm.log}
    entries = [e for e in swarm.truth["malformed"] if e["reason"] == "unknown_node"]
    assert entries
    for entry in entries:
        record = records[entry["file"], entry["index"]]
        assert decode_envelope(record).public_key in unregistered
        # Without a registry the record is valid, or falls to its second defect.
        verdict = validate(record, ValidationPolicy())
        assert getattr(verdict, "reason", None) == entry["also"]


def test_future_event_time_records_stay_in_the_future(swarm):
    verdicts = swarm.verdicts()
    futures = [
        decode_packet(decode_envelope(record).payload)
        for (_, _, record), v in zip(swarm.log, verdicts, strict=True)
        if isinstance(v, Rejection) and v.reason == "future_event_time"
    ]
    assert futures
    assert all(p.event_time_ms >= FAR_FUTURE_MS for p in futures)


def test_unsigned_swarm_skips_signature_defects_and_keeps_the_others(unsigned_swarm):
    report = unsigned_swarm.report
    assert report.malformed_by_reason["unsigned"] == 0
    assert report.malformed_by_reason["bad_signature"] == 0
    others = [r for r in INGEST_REASONS if r not in ("unsigned", "bad_signature")]
    assert all(report.malformed_by_reason[r] >= 1 for r in others)
    assert report.malformed == round(SMALL.malformed_fraction * SMALL.packets)
    for _, _, record in unsigned_swarm.log:
        try:
            envelope = decode_envelope(record)
        except WireError:  # an undecodable record
            continue
        assert envelope.signature == b""

    policy = ValidationPolicy(registry=unsigned_swarm.registry, allow_unsigned=True)
    verdicts = unsigned_swarm.verdicts(policy)
    position = {(name, index): p for p, (name, index, _) in enumerate(unsigned_swarm.log)}
    for entry in unsigned_swarm.truth["malformed"]:
        assert verdicts[position[entry["file"], entry["index"]]].reason == entry["reason"]
    accepted = sum(not isinstance(v, Rejection) for v in verdicts)
    assert accepted == report.valid + report.duplicates + report.conflicting
    assert unsigned_swarm.truth["validation_policy"]["allow_unsigned"] is True


def test_exact_duplicates_are_later_copies_of_the_same_bytes(swarm):
    by_id = collections.defaultdict(list)
    for position, payload, packet in swarm.accepted():
        by_id[packet.packet_id].append((position, payload))
    exact = conflicting = 0
    for copies in by_id.values():
        first = copies[0]
        for position, payload in copies[1:]:
            assert position > first[0]
            record, original = swarm.log[position][2], swarm.log[first[0]][2]
            if payload == first[1]:
                assert record == original
                exact += 1
            else:
                conflicting += 1
    assert exact == swarm.report.duplicates > 0
    assert conflicting == swarm.report.conflicting > 0


def test_conflicting_copies_share_packet_id_and_node_with_a_changed_payload(swarm):
    by_id = collections.defaultdict(list)
    for _, payload, packet in swarm.accepted():
        by_id[packet.packet_id].append((payload, packet))
    conflicts = [c for c in by_id.values() if len({payload for payload, _ in c}) > 1]
    assert len(conflicts) == swarm.report.conflicting
    for (_, original), (_, resent) in conflicts:
        assert resent.node_id == original.node_id
        assert resent.semantic_address == original.semantic_address
        assert resent.approach_id == original.approach_id
        assert resent.outcome_delta != original.outcome_delta
        assert resent.emit_time_ms > original.emit_time_ms


def test_late_packets_are_emitted_hours_after_their_event(swarm):
    lags = {}
    for _, _, packet in swarm.accepted():
        lags[packet.packet_id] = packet.emit_time_ms - packet.event_time_ms
    assert all(lag >= 0 for lag in lags.values())
    late = [lag for lag in lags.values() if lag >= HOUR_MS]
    assert len(late) == swarm.report.late == round(SMALL.late_fraction * SMALL.packets)
    assert max(lags.values()) <= 6 * HOUR_MS
    assert sorted(lags.values())[len(lags) // 2] < 30_000  # the usual delay: ms to seconds


def test_log_is_roughly_but_not_exactly_in_emit_time_order(swarm):
    emits = [packet.emit_time_ms for _, _, packet in swarm.accepted()]
    inversions = sum(b < a for a, b in zip(emits, emits[1:], strict=False))
    assert inversions > 0
    correlation = np.corrcoef(np.arange(len(emits)), np.argsort(np.argsort(emits)))[0, 1]
    assert correlation > 0.95
    events = [packet.event_time_ms for _, _, packet in swarm.accepted()]
    assert min(events) >= SMALL.start_ms and max(events) < SMALL.start_ms + SMALL.span_ms


def test_truth_best_approach_is_the_argmax_with_a_margin(swarm):
    addresses = swarm.truth["addresses"]
    assert len(addresses) == SMALL.addresses
    for facts in addresses.values():
        effects = facts["effects"]
        assert len(effects) == SMALL.approaches
        ranked = sorted(effects.values(), reverse=True)
        assert facts["best_approach"] == max(effects, key=effects.get)
        assert ranked[0] - ranked[1] >= BEST_MARGIN - 1e-9
        assert all(APPROACH_ID_RE.fullmatch(a) for a in effects)


def test_valid_packets_are_addressed_as_their_nodes_would(swarm):
    addresses = swarm.truth["addresses"]
    for address, facts in addresses.items():
        assert facts["template_id"] in TEMPLATES
        assert semantic_address(facts["template_id"], facts["context"]).hex() == address
    node_ids = {node_id_for(key) for key in swarm.registry}
    seen = collections.defaultdict(set)
    types = collections.Counter()
    for _, _, packet in swarm.accepted():
        facts = addresses[packet.semantic_address.hex()]
        assert packet.template_id == facts["template_id"]
        assert packet.approach_id in facts["effects"]
        assert packet.node_id in node_ids
        assert 0.0 <= packet.confidence <= 1.0 and packet.sample_count > 0
        assert 0 < len(packet.metrics) <= MAX_METRICS
        seen[packet.semantic_address.hex()].add((packet.packet_id, packet.node_id))
        types[packet.outcome_type] += 1
    for address, facts in addresses.items():
        assert facts["n_packets"] == len({pid for pid, _ in seen[address]})
        assert facts["n_nodes"] == len({node for _, node in seen[address]})
    assert set(types) == set(OUTCOME_NAMES)  # every outcome type occurs


def test_outcome_type_follows_the_measured_delta():
    delta = np.array([0.05, 0.01, -0.03, 0.001, 0.05])
    samples = np.array([500, 500, 500, 500, 3])  # the last: too few evaluations to tell
    expected = ["RESOLVED", "PARTIAL", "CONTRADICTED", "OPEN", "OPEN"]
    assert outcome_types(delta, samples).tolist() == [OutcomeType[n] for n in expected]


def test_the_best_approach_wins_on_the_data(tmp_path):
    # Enough data per approach: the spec's ranking (success_mean, then mean_delta) finds it.
    config = SwarmConfig(nodes=60, addresses=3, approaches=4, packets=3000, seed=3)
    swarm = run(tmp_path, config)
    stats = collections.defaultdict(lambda: np.zeros(3))  # success, failure, weight * delta
    seen = set()
    for _, _, packet in swarm.accepted():
        if packet.packet_id in seen:
            continue
        seen.add(packet.packet_id)
        s = OUTCOME_SCORES[packet.outcome_type]
        w = packet.confidence
        row = stats[packet.semantic_address.hex(), packet.approach_id]
        if s is not None:
            row += (w * s, w * (1 - s), 0.0)
        row[2] += w * packet.outcome_delta
    for address, facts in swarm.truth["addresses"].items():
        success = {
            a: (1 + stats[address, a][0]) / (2 + stats[address, a][0] + stats[address, a][1])
            for a in facts["effects"]
        }
        assert max(success, key=success.get) == facts["best_approach"]


def test_address_skew_makes_hot_addresses(tmp_path):
    config = dataclasses.replace(TINY, addresses=10, packets=1000, address_skew=1.5)
    report = simulate(str(tmp_path), config)
    truth = json.loads((tmp_path / "truth.json").read_text())
    counts = sorted((f["n_packets"] for f in truth["addresses"].values()), reverse=True)
    assert sum(counts) == report.valid
    assert counts[0] > 4 * counts[len(counts) // 2]


def test_progress_is_reported_every_ten_thousand_records_and_at_the_end(tmp_path):
    calls = []
    config = dataclasses.replace(TINY, packets=PROGRESS_EVERY + 500, signed=False, nodes=20)
    report = simulate(str(tmp_path), config, progress=lambda *args: calls.append(args))
    assert calls == [(PROGRESS_EVERY, report.records), (report.records, report.records)]


@pytest.mark.parametrize(
    "change",
    [
        {"nodes": 0},
        {"addresses": 0},
        {"addresses": MAX_ADDRESSES + 1},
        {"approaches": 1},
        {"approaches": MAX_APPROACHES + 1},
        {"packets": -1},
        {"duplicate_fraction": 1.5},
        {"malformed_fraction": -0.1},
        {"late_fraction": float("nan")},
        {"shards": 0},
        {"address_skew": -1.0},
    ],
)
def test_bad_configs_are_refused(change):
    with pytest.raises(ValueError):
        SwarmConfig(**change)


def test_an_empty_swarm_writes_empty_shards(tmp_path):
    report = simulate(str(tmp_path), dataclasses.replace(TINY, packets=0))
    assert report.records == 0
    assert all(os.path.getsize(p) == 0 for p in report.shard_files)
