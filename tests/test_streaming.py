"""TestStream scripts on the BundleBasedDirectRunner: panes, lateness, dedupe, state, timers.

Watermarks move in small steps and stay strictly past boundaries (beam-facts.md quirks).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from conftest import HOUR_MS, T0_MS, make_record, node_key

from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.settings import Settings, StreamSettings, WindowSettings
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain, read_json_lines
from qis_beam.validation import ValidationPolicy

MIN = 60_000
NOW = T0_MS + 100 * HOUR_MS


def ts(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


def packet(i: int, event_ms: int, key=None, **fields) -> tuple[bytes, int]:
    record = make_record(
        key or node_key(1 + i % 3),
        packet_id=i.to_bytes(16, "big"),
        event_time_ms=event_ms,
        emit_time_ms=event_ms,
        **fields,
    )
    return record, event_ms


def run_script(tmp_path, script, **settings_kw):
    """script: ("add", [(record, event_ms), ...]) or ("wm", ms) steps; returns outputs.

    Ends past every pending timer (state TTL included) before +infinity, as replay does.
    """
    settings = Settings(validation=ValidationPolicy(now_ms=NOW), **settings_kw)
    stream = TestStream().with_output_types(tuple[bytes, str])
    for kind, value in script:
        if kind == "add":
            stream.add_elements(
                [TimestampedValue((record, "test"), ts(event_ms)) for record, event_ms in value]
            )
        else:
            stream.advance_watermark_to(ts(value))
    last_event = max(ms for kind, value in script if kind == "add" for _, ms in value)
    stream.advance_watermark_to(ts(last_event + settings.stream.state_ttl_ms + HOUR_MS))
    stream.advance_watermark_to_infinity()
    output = str(tmp_path / "out")
    options = PipelineOptions([], runner="BundleBasedDirectRunner", streaming=True)
    with beam.Pipeline(options=options) as p:
        build_streaming_graph(p | stream, output, settings, write=WriteJsonLinesOnDrain)
    synthesis = list(read_json_lines(output, "synthesis"))
    dead = list(read_json_lines(output, "dead_letters"))
    windowed = sorted(
        (r for r in synthesis if r["window_start_ms"] is not None),
        key=lambda r: (r["window_start_ms"], r["pane"]["index"]),
    )
    all_time = sorted(
        (r for r in synthesis if r["window_start_ms"] is None),
        key=lambda r: (r["address"], r["pane"]["index"]),
    )
    return windowed, all_time, dead


WINDOWS = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=30 * MIN, early_firing_count=2)


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
