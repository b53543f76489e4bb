"""TestStream scripts on the BundleBasedDirectRunner: panes, lateness, dedupe, state, timers.

Watermarks move in small steps and stay strictly past boundaries (beam-facts.md quirks).
"""

from __future__ import annotations

import collections
import contextlib
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from conftest import HOUR_MS, T0_MS, make_record, node_key
from stream_script import stream_of, ts

from qis_beam.beam_internals.replay_speedups import indexed_direct_timers
from qis_beam.emitter import seal
from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.settings import Settings, StreamSettings, WindowSettings
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain, read_json_lines
from qis_beam.transforms.streaming import AllTimeSnapshots, FlagTooLate, IngestStream, alltime
from qis_beam.validation import ValidationPolicy
from qis_beam.wire import MINUTE_MS

MIN = MINUTE_MS
NOW = T0_MS + 100 * HOUR_MS


def packet(i: int, event_ms: int, key=None, **fields) -> tuple[bytes, int]:
    record = make_record(
        key or node_key(1 + i % 3),
        packet_id=i.to_bytes(16, "big"),
        event_time_ms=event_ms,
        emit_time_ms=event_ms,
        **fields,
    )
    return record, event_ms


def streaming_options() -> PipelineOptions:
    return PipelineOptions([], runner="BundleBasedDirectRunner", streaming=True)


def run_graph(tmp_path, script, **settings_kw) -> dict:
    """The whole streaming graph over the script: its outputs, tallies included."""
    settings = Settings(validation=ValidationPolicy(now_ms=NOW), **settings_kw)
    output = str(tmp_path / "out")
    with beam.Pipeline(options=streaming_options()) as p:
        records = p | stream_of(script, settings)
        build_streaming_graph(records, output, settings, write=WriteJsonLinesOnDrain, tally=True)
    synthesis = list(read_json_lines(output, "synthesis"))
    windowed = sorted(
        (r for r in synthesis if r["window_start_ms"] is not None),
        key=lambda r: (r["window_start_ms"], r["pane"]["index"]),
    )
    all_time = sorted(
        (r for r in synthesis if r["window_start_ms"] is None),
        key=lambda r: (r["address"], r["pane"]["index"]),
    )
    return {
        "windowed": windowed,
        "all_time": all_time,
        "dead": list(read_json_lines(output, "dead_letters")),
        "tallies": {t["counter"]: t["value"] for t in read_json_lines(output, "tallies")},
    }


def run_script(tmp_path, script, **settings_kw):
    out = run_graph(tmp_path, script, **settings_kw)
    return out["windowed"], out["all_time"], out["dead"]


WINDOWS = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=30 * MIN, early_firing_count=2)


@pytest.mark.slow
def test_early_on_time_late_and_too_late(tmp_path):
    script = [
        ("add", [packet(1, T0_MS + 1 * MIN), packet(2, T0_MS + 2 * MIN)]),
        ("wm", T0_MS + 10 * MIN),
        ("add", [packet(3, T0_MS + 3 * MIN)]),
        ("wm", T0_MS + 30 * MIN),
        ("wm", T0_MS + 50 * MIN),
        ("wm", T0_MS + HOUR_MS + 1 * MIN),  # window [T0, T0+1h) fires ON_TIME
        ("add", [packet(4, T0_MS + 5 * MIN)]),  # late, within lateness: a LATE pane
        ("wm", T0_MS + HOUR_MS + 20 * MIN),
        ("wm", T0_MS + HOUR_MS + 40 * MIN),  # strictly past end + lateness
        ("add", [packet(5, T0_MS + 6 * MIN)]),  # too late for its window
        ("wm", T0_MS + 2 * HOUR_MS),
        ("wm", T0_MS + 3 * HOUR_MS),
    ]
    windowed, all_time, dead = run_script(tmp_path, script, windows=WINDOWS)
    panes = [(r["pane"]["timing"], r["pane"]["index"], r["n_packets"]) for r in windowed]
    assert panes == [("EARLY", 0, 2), ("ON_TIME", 1, 3), ("LATE", 2, 4)]
    assert {r["window_start_ms"] for r in windowed} == {T0_MS}
    too_late = [d for d in dead if d["reason"] == "too_late"]
    assert [d["packet_id"] for d in too_late] == [(5).to_bytes(16, "big").hex()]
    # the too-late packet still reaches the all-time synthesis
    assert all_time[-1]["n_packets"] == 5
    assert all_time[-1]["pane"]["is_last"] is True
    assert [r["pane"]["index"] for r in all_time] == list(range(len(all_time)))


@pytest.mark.slow
def test_duplicates_and_conflicts_across_bundles_first_arrival_wins(tmp_path):
    first, event_ms = packet(1, T0_MS + MIN, outcome_delta=0.9)
    conflicting, _ = packet(1, T0_MS + MIN, outcome_delta=0.1)  # same id, other payload
    other, _ = packet(2, T0_MS + 2 * MIN)
    script = [
        ("add", [(first, event_ms), (other, T0_MS + 2 * MIN)]),
        ("wm", T0_MS + 5 * MIN),
        ("add", [(first, event_ms)]),  # exact replay
        ("wm", T0_MS + 10 * MIN),
        ("add", [(conflicting, event_ms)]),
        ("wm", T0_MS + 20 * MIN),
        ("wm", T0_MS + 2 * HOUR_MS),
    ]
    windowed, all_time, dead = run_script(tmp_path, script, windows=WINDOWS)
    assert [d["reason"] for d in dead] == ["conflicting_duplicate"]
    assert dead[0]["packet_id"] == (1).to_bytes(16, "big").hex()
    final = all_time[-1]
    assert final["n_packets"] == 2
    # the first arrival (delta 0.9) was kept, not the smaller payload
    assert abs(final["mean_delta"] - (0.9 * 0.8 + 0.04 * 0.8) / 1.6) < 1e-6


@pytest.mark.slow
def test_dedupe_ttl_forgets_old_packet_ids(tmp_path):
    record, event_ms = packet(1, T0_MS + MIN)
    script = [
        ("add", [(record, event_ms)]),
        ("wm", T0_MS + 30 * MIN),
        ("wm", T0_MS + HOUR_MS),
        ("wm", T0_MS + 90 * MIN),
        ("add", [(record, event_ms)]),  # after the dedupe TTL: counted again
        ("wm", T0_MS + 2 * HOUR_MS),
    ]
    stream = StreamSettings(dedupe_ttl_ms=HOUR_MS)
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=4 * HOUR_MS)
    _, all_time, dead = run_script(tmp_path, script, windows=windows, stream=stream)
    assert all_time[-1]["n_packets"] == 2 and dead == []


@pytest.mark.slow
def test_state_ttl_clears_idle_address_and_snapshots_are_throttled(tmp_path):
    stream = StreamSettings(emit_every_ms=10 * MIN, state_ttl_ms=2 * HOUR_MS)
    script = [("add", [packet(1, T0_MS + 1 * MIN)]), ("wm", T0_MS + 1 * MIN)]
    # three more packets inside the same 10-minute period: still one snapshot for it
    for i, minute in enumerate((2, 3, 4), start=2):
        script += [("add", [packet(i, T0_MS + minute * MIN)]), ("wm", T0_MS + minute * MIN)]
    script += [("wm", T0_MS + 11 * MIN)]
    script += [("add", [packet(9, T0_MS + 12 * MIN)]), ("wm", T0_MS + 15 * MIN)]
    script += [("wm", T0_MS + m * MIN) for m in (20, 25, 40, 60, 90, 120, 140, 150)]
    # the address was idle for > 2h (last event at +12m): state cleared; a new packet restarts it
    script += [("add", [packet(10, T0_MS + 155 * MIN)]), ("wm", T0_MS + 170 * MIN)]
    script += [("wm", T0_MS + m * MIN) for m in (200, 250, 300, 330)]
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=HOUR_MS)
    _, all_time, _ = run_script(tmp_path, script, windows=windows, stream=stream)
    counts = [(r["pane"]["index"], r["n_packets"], r["pane"]["is_last"]) for r in all_time]
    # first life: snapshot after period [0,10m) with 4 packets, after [10m,20m) with 5,
    # final snapshot at expiry; second life starts again at index 0 with 1 packet.
    first_life = [c for c in counts if c[1] >= 4]
    assert first_life == [(0, 4, False), (1, 5, False), (2, 5, True)]
    assert (0, 1, False) in counts and (1, 1, True) in counts


# --- dedupe per packet_id, exact too-late, all-time folding, flat state -------------------


@pytest.mark.slow
def test_dedupe_per_packet_id_holds_for_its_ttl_then_forgets(tmp_path):
    """Each packet_id is its own key: copies inside the TTL of *that* id are duplicates or
    conflicts, copies after it count again, whatever other ids do meanwhile."""
    early = [packet(i, T0_MS + i * MIN) for i in range(1, 6)]  # ids 1-5 at +1..+5 min
    late = [packet(i, T0_MS + 50 * MIN + i * MIN) for i in range(6, 9)]  # ids 6-8 at +56..+58
    conflicting, _ = packet(7, T0_MS + 57 * MIN, outcome_delta=0.5)
    script = [
        ("add", early),
        ("wm", T0_MS + 20 * MIN),
        ("add", [early[0], early[1]]),  # duplicates, inside their TTL
        ("wm", T0_MS + 40 * MIN),
        ("add", late),
        ("wm", T0_MS + 62 * MIN),
        ("wm", T0_MS + 64 * MIN),  # ids 1-4 expired (first event + 1h), ids 5-8 not yet
        ("add", [early[0], early[2], early[4], late[0]]),  # 1, 3 count again; 5, 6 duplicates
        ("add", [(conflicting, T0_MS + 57 * MIN)]),  # id 7, other payload: dead letter
        ("wm", T0_MS + 2 * HOUR_MS),
        ("wm", T0_MS + 3 * HOUR_MS),
        ("add", [late[1], late[2]]),  # ids 7, 8 expired at +1h57m/+1h58m: count again
        ("wm", T0_MS + 4 * HOUR_MS),
    ]
    stream = StreamSettings(dedupe_ttl_ms=HOUR_MS)
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=6 * HOUR_MS)
    out = run_graph(tmp_path, script, windows=windows, stream=stream)
    assert out["tallies"] == {"records_in": 17, "valid": 12, "duplicates": 4}
    assert [(d["reason"], d["packet_id"]) for d in out["dead"]] == [
        ("conflicting_duplicate", (7).to_bytes(16, "big").hex())
    ]
    assert out["all_time"][-1]["n_packets"] == 12


def _late_script(seed: int, n_steps: int = 30):
    """Packets arriving while the watermark climbs in 10-minute steps, each 0-100 min late.

    Returns the script and, per packet id, (event_ms, watermark when it was added).
    """
    rng = random.Random(seed)
    script, sent = [], {}
    watermark = T0_MS
    seen = float("-inf")  # the watermark packets meet: none has been set before the first step
    next_id = 1
    for step in range(1, n_steps + 1):
        batch = []
        for _ in range(rng.randint(1, 4)):
            # odd seconds: no packet's deadline ever equals a watermark step
            event_ms = watermark - rng.randint(0, 100) * MIN + 7_000
            batch.append(packet(next_id, event_ms))
            sent[next_id] = (event_ms, seen)
            next_id += 1
        script.append(("add", batch))
        watermark = seen = T0_MS + step * 10 * MIN
        script.append(("wm", watermark))
    return script, sent


def _too_late_ids(out) -> set[int]:
    return {int(d["packet_id"], 16) for d in out["dead"] if d["reason"] == "too_late"}


@pytest.mark.slow
def test_too_late_is_exact_windowed_plus_too_late_equals_valid(tmp_path):
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=20 * MIN)
    script, sent = _late_script(seed=5)
    out = run_graph(tmp_path, script, windows=windows)
    last_panes = {}
    for record in out["windowed"]:
        last_panes[record["window_start_ms"]] = record  # sorted by pane index
    windowed_packets = sum(r["n_packets"] for r in last_panes.values())
    too_late = _too_late_ids(out)
    assert out["tallies"]["valid"] == len(sent)
    assert windowed_packets + len(too_late) == len(sent)
    # Beam drops a packet when the watermark it meets is past its window end + lateness.
    expected = {
        i
        for i, (event_ms, wm) in sent.items()
        if wm > event_ms - event_ms % HOUR_MS + HOUR_MS + 20 * MIN
    }
    assert too_late == expected and 0 < len(expected) < len(sent)
    letters = [d for d in out["dead"] if d["reason"] == "too_late"]
    # ids and sources only: no raw record is held in state for this
    assert {(d["record_b64"], d["source"]) for d in letters} == {(None, "test")}
    assert out["all_time"][-1]["n_packets"] == len(sent)


@pytest.mark.slow
def test_too_late_with_sliding_windows_means_missing_the_last_window(tmp_path):
    windows = WindowSettings(size_ms=HOUR_MS, period_ms=30 * MIN, allowed_lateness_ms=10 * MIN)
    script, sent = _late_script(seed=11, n_steps=24)
    out = run_graph(tmp_path, script, windows=windows)
    expected = {
        i
        for i, (event_ms, wm) in sent.items()
        if wm > event_ms - event_ms % (30 * MIN) + HOUR_MS + 10 * MIN
    }
    assert _too_late_ids(out) == expected and 0 < len(expected) < len(sent)


@pytest.mark.slow
def test_all_time_folds_bursts_past_the_buffer_cap_and_expires_with_a_final_snapshot(
    tmp_path, monkeypatch
):
    # a tiny cap: bursts fold inline several times within one emission period
    monkeypatch.setattr(alltime, "PENDING_CAP_BYTES", 500)
    stream = StreamSettings(emit_every_ms=10 * MIN, state_ttl_ms=HOUR_MS)
    burst = [packet(i, T0_MS + MIN + i * 1000) for i in range(1, 31)]  # 30 packets in +1..+2m
    script = [
        ("add", burst[:12]),
        ("add", burst[12:]),
        ("wm", T0_MS + 5 * MIN),
        ("wm", T0_MS + 11 * MIN),  # period [0, 10m) ends: one snapshot with all 30
        ("add", [packet(40, T0_MS + 12 * MIN)]),
        ("wm", T0_MS + 15 * MIN),
        ("wm", T0_MS + 21 * MIN),  # second snapshot: 31 packets
        *[("wm", T0_MS + m * MIN) for m in (40, 60, 75, 80, 90)],  # idle 1h after +12m: expiry
    ]
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=HOUR_MS)
    _, all_time, _ = run_script(tmp_path, script, windows=windows, stream=stream)
    assert [(r["pane"]["index"], r["n_packets"], r["pane"]["is_last"]) for r in all_time] == [
        (0, 30, False),
        (1, 31, False),
        (2, 31, True),
    ]


@contextlib.contextmanager
def recorded_state_sizes(monkeypatch):
    """Largest encoded state value per key written by each (DoFn, state cell).

    Read from what the DirectRunner stores after each commit; a bag counts whole, as
    Flink's RocksDB backend stores a list state under one key.
    """
    from apache_beam.runners.direct import direct_userstate

    sizes: dict[tuple[str, str], int] = collections.defaultdict(int)
    original = direct_userstate.DirectUserStateContext.commit

    def commit(self):
        original(self)
        for encoded_key, window, spec in list(self.cached_states):
            state = self.step_context.get_keyed_state(encoded_key)
            stored = state.state.get(window, {}).get(self.state_tags[spec].tag, [])
            cell = (type(self.dofn).__name__, spec.name)
            sizes[cell] = max(sizes[cell], sum(len(v) for v in stored))

    monkeypatch.setattr(direct_userstate.DirectUserStateContext, "commit", commit)
    yield sizes


def _traffic(n: int) -> list:
    """n packets over the same 2 h, 2 addresses, 12 nodes and 4 approaches: only the rate
    changes with n. Unsigned (signing is not what this measures)."""
    from conftest import make_packet

    from qis_beam.address import semantic_address

    addresses = [semantic_address("llm-finetune/v1", {"task": f"t{a}"}) for a in range(2)]
    keys = [node_key(k) for k in range(1, 13)]
    out = []
    for i in range(n):
        key = keys[i % 12]
        event_ms = T0_MS + (i * 2 * HOUR_MS) // n
        p = make_packet(
            key,
            address=addresses[i % 2],
            approach_id=f"a{i % 4}",
            packet_id=(10**9 + i).to_bytes(16, "big"),
            event_time_ms=event_ms,
            emit_time_ms=event_ms,
        )
        out.append((seal(None, p, public_key=key.public_key), event_ms))
    return out


def _state_sizes(n: int, monkeypatch) -> dict:
    packets = _traffic(n)
    script = []
    for step in range(8):  # 15-minute steps of event time
        script.append(("add", packets[step * n // 8 : (step + 1) * n // 8]))
        script.append(("wm", T0_MS + (step + 1) * 15 * MIN))
    settings = Settings(validation=ValidationPolicy(now_ms=NOW, allow_unsigned=True))
    with (
        monkeypatch.context() as patch,
        recorded_state_sizes(patch) as sizes,
        indexed_direct_timers(),
        beam.Pipeline(options=streaming_options()) as p,
    ):
        records = p | stream_of(script, settings)
        packets_out, _, _ = records | IngestStream(settings.validation, settings.stream)
        packets_out | AllTimeSnapshots(settings.stream, settings.synthesis)
        packets_out | FlagTooLate(settings.windows)
    return dict(sizes)


@pytest.mark.slow  # two TestStream runs of 5k and 40k packets (~2 min on 2 busy cores)
def test_largest_state_value_per_key_stays_flat_as_traffic_grows(monkeypatch):
    small = _state_sizes(5_000, monkeypatch)
    large = _state_sizes(40_000, monkeypatch)  # 8x the rate, same TTLs
    cells = {
        ("_FirstArrivalFn", "digest"),
        ("_AllTimeSnapshotFn", "synthesis"),
        ("_AllTimeSnapshotFn", "pending"),
        ("_ReconcileFn", "marks"),
    }
    assert cells <= small.keys() and small.keys() == large.keys()
    for cell, size in large.items():
        assert size <= 1.3 * small[cell] + 8, (cell, small[cell], size)
    # the bag of unfolded payloads is bounded by its cap, not by the rate
    assert large[("_AllTimeSnapshotFn", "pending")] <= alltime.PENDING_CAP_BYTES + 1024


@pytest.mark.slow
def test_continuous_json_lines_write_one_file_per_flush_per_shard(tmp_path):
    """The run sink rolls files by processing time: each flush writes one file per shard,
    whatever the number of bundles, and every record lands in exactly one file."""
    from qis_beam.transforms.outputs import WriteJsonLinesContinuously

    stream = TestStream().with_output_types(dict)
    records = []
    for flush in range(3):
        for bundle in range(4):  # one add_elements call is one bundle
            batch = [{"flush": flush, "bundle": bundle, "i": i} for i in range(5)]
            records += batch
            stream.add_elements(batch)
        stream.advance_processing_time(61)
        stream.advance_watermark_to(ts(T0_MS + flush * MIN))
    stream.advance_watermark_to_infinity()
    output = str(tmp_path / "out")
    with beam.Pipeline(options=streaming_options()) as p:
        p | stream | WriteJsonLinesContinuously(output, "synthesis", flush_seconds=60, shards=2)
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert len(files) <= 3 * 2 and all(f.startswith("synthesis-") for f in files), files
    flushes = {f.split("-")[2] for f in files}  # pane index: one per flush
    assert len(flushes) == 3, files
    written = list(read_json_lines(output, "synthesis"))
    key = lambda r: (r["flush"], r["bundle"], r["i"])  # noqa: E731
    assert sorted(written, key=key) == sorted(records, key=key)


def test_accumulated_panes_are_cumulative_whatever_order_they_arrive_in():
    """Panes of one window reaching ``AccumulatePanes`` out of order (Prism, or any runner
    that does not keep a key's order across a shuffle): every record holds all panes seen so
    far, and the record with the highest index holds the whole window."""
    from apache_beam.testing.util import assert_that, equal_to

    from qis_beam.partials import add_packet
    from qis_beam.synthesis import Synthesis, SynthesisParams
    from qis_beam.transforms.streaming.windowed import _AccumulatePanesFn
    from qis_beam.validation import validate

    def parsed(i):
        return validate(packet(i, T0_MS + i * MIN)[0], ValidationPolicy(now_ms=NOW)).packet

    def partial(*ids):
        s = Synthesis()
        for i in ids:
            add_packet(s, parsed(i))
        return s

    address = parsed(1).semantic_address.hex()
    key = (address, T0_MS)
    # Beam fired EARLY (1, 2), ON_TIME (3) and LATE (4); they arrive ON_TIME, LATE, EARLY.
    arriving = [
        (key, (partial(3), "ON_TIME", False)),
        (key, (partial(4), "LATE", False)),
        (key, (partial(1, 2), "EARLY", False)),
    ]
    fn = _AccumulatePanesFn(SynthesisParams(), WindowSettings(size_ms=HOUR_MS))
    with beam.Pipeline(options=streaming_options()) as p:
        stream = TestStream().with_output_types(tuple[tuple[str, int], tuple])
        for element in arriving:  # one bundle each, in this order
            stream = stream.add_elements([element])
        records = p | stream.advance_watermark_to_infinity() | beam.ParDo(fn)
        summary = records | beam.Map(
            lambda r: (r["pane"]["index"], r["pane"]["timing"], r["n_packets"], r["window_end_ms"])
        )
        end = T0_MS + HOUR_MS
        assert_that(
            summary, equal_to([(0, "ON_TIME", 1, end), (1, "LATE", 2, end), (2, "EARLY", 4, end)])
        )
