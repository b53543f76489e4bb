"""``plan_replay``: packet logs -> the arrival order, batches and watermarks a replay plays.

Beam-free: the plan decides what a replay can get right (too-late packets, pane timings), so
it is checked here on small logs whose every step is worked out by hand.
"""

from __future__ import annotations

from conftest import T0_MS, make_record, node_key

from qis_beam.replay import plan_replay
from qis_beam.tfrecords import write_record

S = 1000


def record(i: int, emit_s: int, event_s: int | None = None) -> bytes:
    event_s = emit_s - 30 if event_s is None else event_s
    return make_record(
        node_key(i % 3),
        packet_id=i.to_bytes(16, "big"),
        event_time_ms=T0_MS + event_s * S,
        emit_time_ms=T0_MS + emit_s * S,
    )


def write_log(path, records) -> str:
    with open(path, "wb") as f:
        for r in records:
            write_record(f, r)
    return str(path)


def test_two_logs_play_in_emit_order_in_steps_with_a_delayed_watermark(tmp_path):
    a = [record(1, 10), record(2, 70), record(3, 200, event_s=5)]
    garbage = b"\x01not an envelope"
    b = [record(4, 20), record(5, 65), garbage, record(6, 130)]
    paths = [write_log(tmp_path / "b.tfrecord", b), write_log(tmp_path / "a.tfrecord", a)]

    plan = plan_replay(paths, watermark_delay_ms=5 * S, step_ms=60 * S)

    # the unparsable record keeps its place right after the record before it (emit 65 s)
    played = [[r for r, _, _ in step.elements] for step in plan.steps]
    assert played == [[a[0], b[0]], [b[1], garbage, a[1]], [b[3]], [a[2]]]
    # each step's watermark is the end of its emit-time step minus the delay; none after
    # the last step (the drain decides it)
    assert [step.watermark_ms for step in plan.steps] == [
        T0_MS + 55 * S,
        T0_MS + 115 * S,
        T0_MS + 175 * S,
        None,
    ]
    # elements are stamped with their event time (the garbage: the emit time it was given)
    stamps = [t - T0_MS for step in plan.steps for _, _, t in step.elements]
    assert stamps == [-20 * S, -10 * S, 35 * S, 65 * S, 40 * S, 100 * S, 5 * S]
    sources = {r: s for step in plan.steps for r, s, _ in step.elements}
    assert sources[a[0]] == paths[1] and sources[garbage] == paths[0]
    assert plan.records == 7
    assert (plan.first_emit_ms, plan.last_emit_ms) == (T0_MS + 10 * S, T0_MS + 200 * S)
    assert plan.last_event_ms == T0_MS + 100 * S  # the latest stamp, not the last one


def test_watermark_never_passes_a_step_still_to_be_played(tmp_path):
    """Whatever the delay, every element arrives at or after its step's start, and the
    watermark after a step is below the emit time of every later element."""
    emits = [0, 1, 59, 60, 61, 119, 120, 300, 301, 302, 900]
    records = [record(i, e) for i, e in enumerate(emits)]
    path = write_log(tmp_path / "p.tfrecord", records)
    for delay_s in (0, 5, 90):
        plan = plan_replay([path], watermark_delay_ms=delay_s * S, step_ms=60 * S)
        assert [r for step in plan.steps for r, _, _ in step.elements] == records
        assert [len(step.elements) for step in plan.steps] == [3, 3, 1, 3, 1]
        played = 0
        for step in plan.steps[:-1]:
            played += len(step.elements)
            later = min(T0_MS + e * S for e in emits[played:])
            assert step.watermark_ms is not None and step.watermark_ms <= later - delay_s * S


def test_an_empty_log_plans_nothing(tmp_path):
    plan = plan_replay([write_log(tmp_path / "empty.tfrecord", [])], 5 * S, 60 * S)
    assert plan.steps == [] and plan.records == 0
    assert plan.first_emit_ms is plan.last_emit_ms is plan.last_event_ms is None


def test_a_corrupt_tail_is_played_once_after_the_framed_records(tmp_path):
    records = [record(i, 10 * i) for i in range(1, 4)]
    path = tmp_path / "p.tfrecord"
    write_log(path, records)
    data = bytearray(path.read_bytes())
    cut = len(data) - len(records[-1]) // 2
    data[cut] ^= 0xFF  # inside the last record's data: its checksum fails
    path.write_bytes(bytes(data))
    plan = plan_replay([str(path)], 5 * S, 60 * S)
    elements = [e for step in plan.steps for e in step.elements]
    assert [r for r, _, _ in elements[:2]] == records[:2]
    assert len(elements) == plan.records == 3
    tail, _, stamp = elements[2]
    assert tail not in records and len(tail) <= 4096
    assert stamp == T0_MS + 20 * S  # the emit time of the last good record before it
