"""Backfill on the FnApiRunner: ingestion accounting, dead letters, dedupe, outputs, and the
synthesis of fixed and sliding windows, hot-key fanout and any dedupe shard count checked
against a packet-by-packet reference (tests/brute_force.py)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from brute_force import assert_same_syntheses, by_key, expected_records
from conftest import ADDRESS, HOUR_MS, T0_MS, fnapi_options, make_record, node_key
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.jobs import run_job
from qis_beam.pipelines.backfill import build_backfill
from qis_beam.settings import Settings
from qis_beam.store import IntelligenceStore
from qis_beam.tfrecords import write_record
from qis_beam.transforms.outputs import read_json_lines
from qis_beam.validation import ValidationPolicy
from qis_beam.wire import payload_of

# Every test here runs a backfill on the FnApiRunner.
pytestmark = pytest.mark.slow

NOW = T0_MS + 48 * HOUR_MS


def write_log(path, records):
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)


def backfill(tmp_path, shards: dict[str, list[bytes]], **settings_kw):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, records in shards.items():
        write_log(inputs / name, records)
    output = str(tmp_path / "out")
    settings = Settings(validation=ValidationPolicy(now_ms=NOW), **settings_kw)
    summary = run_job(
        lambda p: build_backfill(p, str(inputs / "*.tfrecord"), output, settings),
        output,
        fnapi_options(),
    )
    return summary, output


def pid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_accounting_dedupe_and_dead_letters(tmp_path):
    a, b = node_key(1), node_key(2)
    good = [
        make_record(
            a, packet_id=pid(i), event_time_ms=T0_MS + i * 60_000, emit_time_ms=T0_MS + i * 60_000
        )
        for i in range(20)
    ]
    replay = good[:3]  # exact copies in another shard
    conflict_low = make_record(b, packet_id=pid(100), outcome_delta=0.5)
    conflict_high = make_record(b, packet_id=pid(100), outcome_delta=0.9)
    low, high = sorted([conflict_low, conflict_high], key=payload_of)
    garbage = b"\x00not a packet"
    truncated = make_record(a, packet_id=pid(200))[:-1]
    summary, output = backfill(
        tmp_path,
        {
            "packets-0.tfrecord": good[:10] + [high, garbage],
            "packets-1.tfrecord": good[10:] + replay + [low, truncated],
        },
        dedupe_shards=3,
        read_batch_size=4,
    )
    assert summary["records_in"] == 20 + 3 + 2 + 2
    assert summary["valid"] == 21  # 20 good + the conflict winner
    assert summary["duplicates"] == 3
    assert summary["dead_letters"]["by_reason"]["conflicting_duplicate"] == 1
    assert summary["dead_letters"]["total"] == 3
    assert summary["balanced"] is True
    dead = list(read_json_lines(output, "dead_letters"))
    by_reason = {d["reason"]: d for d in dead}
    conflict = by_reason["conflicting_duplicate"]
    assert base64.b64decode(conflict["record_b64"]) == high
    assert conflict["packet_id"] == pid(100).hex()
    assert conflict["source"].endswith("packets-0.tfrecord")
    raw_dead = {base64.b64decode(d["record_b64"]): d["reason"] for d in dead}
    assert raw_dead[garbage] == "undecodable"
    assert raw_dead[truncated] in {"undecodable", "bad_signature"}
    for d in dead:
        assert set(d) == {"reason", "detail", "record_b64", "packet_id", "source"}
    with open(f"{output}/summary.json") as f:
        assert json.load(f)["records_in"] == summary["records_in"]


def test_outputs_windows_store_and_idempotence(tmp_path):
    a, b, c = node_key(1), node_key(2), node_key(3)
    records = []
    for i in range(12):
        key = (a, b, c)[i % 3]
        # packets 0-5 in the first hour (one exactly at the window start), 6-11 in the second
        t = T0_MS + (0 if i < 6 else HOUR_MS) + (i % 6) * 60_000
        records.append(
            make_record(
                key, packet_id=pid(i), event_time_ms=t, emit_time_ms=t, outcome_type=1 + i % 3
            )
        )
    summary, output = backfill(tmp_path, {"packets-0.tfrecord": records})
    assert summary["addresses"] == 1 and summary["windows"] == 2
    synthesis = list(read_json_lines(output, "synthesis"))
    windowed = sorted(
        (r for r in synthesis if r["window_start_ms"] is not None),
        key=lambda r: r["window_start_ms"],
    )
    all_time = [r for r in synthesis if r["window_start_ms"] is None]
    assert [w["window_start_ms"] for w in windowed] == [T0_MS, T0_MS + HOUR_MS]
    assert [w["window_end_ms"] for w in windowed] == [T0_MS + HOUR_MS, T0_MS + 2 * HOUR_MS]
    assert [w["n_packets"] for w in windowed] == [6, 6]
    assert windowed[0]["first_event_ms"] == T0_MS
    assert len(all_time) == 1 and all_time[0]["n_packets"] == 12
    assert all_time[0]["n_nodes"] == 3 and all_time[0]["synthesis_paths"] == 3
    assert all_time[0]["window_end_ms"] is None
    assert all_time[0]["pane"] == {"timing": "ON_TIME", "index": 0, "is_last": True}

    db = f"{output}/intelligence.db"
    with IntelligenceStore(db) as store:
        first = (store.latest(all_time[0]["address"]), store.windows(all_time[0]["address"]))
    assert first[0] == all_time[0]
    # Re-running the same backfill into the same output yields the same store.
    output2 = str(tmp_path / "out")
    settings = Settings(validation=ValidationPolicy(now_ms=NOW))
    run_job(
        lambda p: build_backfill(p, str(tmp_path / "in" / "*.tfrecord"), output2, settings),
        output2,
        fnapi_options(),
    )
    with IntelligenceStore(db) as store:
        again = (store.latest(all_time[0]["address"]), store.windows(all_time[0]["address"]))
    assert again == first


def test_corrupt_shard_tail_is_one_dead_letter(tmp_path):
    records = [make_record(node_key(1), packet_id=pid(i)) for i in range(5)]
    summary, output = backfill(tmp_path, {"packets-0.tfrecord": records})
    path = tmp_path / "in" / "packets-0.tfrecord"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    output2 = str(tmp_path / "out2")
    settings = Settings(validation=ValidationPolicy(now_ms=NOW))
    summary = run_job(
        lambda p: build_backfill(p, str(path), output2, settings), output2, fnapi_options()
    )
    assert summary["dead_letters"]["by_reason"]["undecodable"] == 1
    assert summary["valid"] < 5 and summary["balanced"]
    dead = list(read_json_lines(output2, "dead_letters"))
    assert "corrupt TFRecord framing" in dead[0]["detail"]


def varied_records(n: int, hours: int = 3) -> list[bytes]:
    """n distinct packets over two addresses, six nodes, four approaches, every outcome."""
    from qis_beam.address import semantic_address

    addresses = [ADDRESS, semantic_address("llm-finetune/v1", {"task": "seq2seq"})]
    return [
        make_record(
            node_key(i % 6),
            packet_id=pid(i),
            address=addresses[i % 5 == 0],
            approach_id=f"lr_schedule={('cosine', 'linear', 'constant', 'step')[i % 4]}",
            outcome_type=1 + (i * 7) % 4,
            outcome_delta=((i * 37) % 19 - 9) / 10,
            confidence=0.3 + (i % 7) / 10,
            event_time_ms=T0_MS + (i * 7_919_000) % (hours * HOUR_MS),
            emit_time_ms=T0_MS + (i * 7_919_000) % (hours * HOUR_MS),
        )
        for i in range(n)
    ]


def test_hot_key_fanout_gives_the_same_synthesis_as_none(tmp_path):
    """Every record, windowed and all-time, is the same with and without the fanout, and the
    same as the packet-by-packet reference (so the fanout can neither add nor lose data)."""
    records = varied_records(60)
    outputs = {}
    for fanout in (0, 3):
        run = tmp_path / f"fanout-{fanout}"
        run.mkdir()
        summary, output = backfill(
            run, {"packets-0.tfrecord": records}, hot_key_fanout=fanout, read_batch_size=7
        )
        assert summary["valid"] == 60
        outputs[fanout] = by_key(read_json_lines(output, "synthesis"))
    assert_same_syntheses(outputs[3], outputs[0])
    assert_same_syntheses(outputs[0], expected_records(records, HOUR_MS))


def test_ranges_held_and_folded_a_few_at_a_time_give_the_reference_synthesis(tmp_path, monkeypatch):
    """The fold holds ranges until they cover SORTED_PACKETS, reads them in event-time order
    and folds every FOLD_PACKETS: with both tiny, many groups and folds per bundle give the
    same records as the packet-by-packet reference."""
    from qis_beam.transforms import synthesize

    monkeypatch.setattr(synthesize, "SORTED_PACKETS", 10)
    monkeypatch.setattr(synthesize, "FOLD_PACKETS", 4)
    groups = []
    fold_held = synthesize._FoldRangesFn._fold_held

    def counted(self):
        groups.append(len(self._ranges))
        yield from fold_held(self)

    monkeypatch.setattr(synthesize._FoldRangesFn, "_fold_held", counted)
    records = varied_records(60)
    random.Random(7).shuffle(records)  # ranges then start at unordered event times
    shards = {"packets-0.tfrecord": records[:30], "packets-1.tfrecord": records[30:]}
    summary, output = backfill(tmp_path, shards, read_batch_size=4)
    assert summary["valid"] == 60
    assert len([n for n in groups if n]) >= 3
    got = by_key(read_json_lines(output, "synthesis"))
    assert_same_syntheses(got, expected_records(records, HOUR_MS))


def test_hot_key_fanout_really_splits_the_merges(tmp_path):
    """The comparison above is not vacuous: with a fanout the merges go through Beam's
    hot-key pre-combine, without one they do not."""
    import apache_beam as beam

    (tmp_path / "p.tfrecord").write_bytes(b"")

    def labels(fanout):
        pipeline = beam.Pipeline(options=fnapi_options())
        settings = Settings(hot_key_fanout=fanout)
        build_backfill(pipeline, str(tmp_path / "*.tfrecord"), str(tmp_path / "o"), settings)
        return [t.unique_name for t in pipeline.to_runner_api().components.transforms.values()]

    hot = [label for label in labels(3) if "SplitHotCold" in label]
    assert {label.split("/")[0] for label in hot} == {"Synthesize"}
    assert not any("SplitHotCold" in label for label in labels(0))


def test_sliding_windows_end_to_end_match_a_brute_force_fold(tmp_path):
    """``backfill --window 1h --window-period 15m``: every packet is in four windows; each
    window's record equals the packets of [start, start + 1h) folded one by one."""
    from qis_beam.cli import main

    records = varied_records(80)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_log(inputs / "packets-0.tfrecord", records[:50])
    write_log(inputs / "packets-1.tfrecord", records[50:])
    output = tmp_path / "out"
    argv = ["backfill", "--input", str(inputs / "*.tfrecord"), "--output", str(output)]
    argv += ["--window", "1h", "--window-period", "15m", "--runner", "FnApiRunner"]
    assert main(argv) == 0
    got = by_key(read_json_lines(str(output), "synthesis"))
    want = expected_records(records, HOUR_MS, 15 * 60_000)
    assert_same_syntheses(got, want)
    windows = [row for row in got.values() if row["window_start_ms"] is not None]
    assert {row["window_end_ms"] - row["window_start_ms"] for row in windows} == {HOUR_MS}
    assert {row["window_start_ms"] % (15 * 60_000) for row in windows} == {0}
    assert sum(row["n_packets"] for row in windows) == 4 * 80


@settings(max_examples=6, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(0, 2**32 - 1))
def test_any_bytes_through_the_pipeline_land_in_exactly_one_place(tmp_path_factory, junk, seed):
    """Garbage, mutated copies and duplicates mixed into a log: nothing crashes or vanishes."""
    rng = random.Random(seed)
    good = [make_record(node_key(i % 3), packet_id=pid(i)) for i in range(8)]
    mutated = []
    for record in good[:4]:
        data = bytearray(record)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        mutated.append(bytes(data))
    records = good + good[:2] + mutated + junk
    rng.shuffle(records)
    tmp_path = tmp_path_factory.mktemp("fuzz")
    summary, output = backfill(tmp_path, {"packets-0.tfrecord": records}, read_batch_size=5)
    assert summary["records_in"] == len(records)
    assert summary["balanced"]
    dead = list(read_json_lines(output, "dead_letters"))
    assert len(dead) == summary["dead_letters"]["total"]
    assert all(base64.b64decode(d["record_b64"]) in records for d in dead)


@settings(max_examples=8, deadline=None)
@given(
    copies=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2)), min_size=1, max_size=24),
    shards=st.sampled_from([1, 2, 3, 16, 64]),
    files=st.integers(1, 3),
    batch=st.integers(1, 5),
)
def test_dedupe_follows_the_batch_rule_for_any_shard_count(
    tmp_path_factory, copies, shards, files, batch
):
    """Copies of a few packet_ids, some identical, some changed, spread over files and ranges:
    whatever the number of dedupe shards, the kept packets, duplicates and conflicting dead
    letters (with their raw records) are exactly those of the reference rule."""
    import qis_beam.dedupe as dedupe_module
    from qis_beam.dedupe import dedupe

    records = [
        make_record(
            node_key(i % 3),
            packet_id=pid(i),
            outcome_delta=variant / 10,
            event_time_ms=T0_MS + i * 600_000,
            emit_time_ms=T0_MS + i * 600_000,
        )
        for i, variant in copies
    ]
    by_file = {f"packets-{k}.tfrecord": records[k::files] for k in range(files)}
    tmp_path = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedupe_module, "MIN_SHARDS", 1)  # so that `shards` is the shard count
        summary, output = backfill(tmp_path, by_file, dedupe_shards=shards, read_batch_size=batch)

    sources = [(pid(i), r, "f") for (i, _), r in zip(copies, records, strict=True)]
    reference = dedupe(sources, payload_of)
    assert summary["valid"] == len(reference.kept)
    assert summary["duplicates"] == reference.duplicates
    dead = list(read_json_lines(output, "dead_letters"))
    assert sorted(base64.b64decode(d["record_b64"]) for d in dead) == sorted(
        r for _, r, _ in reference.conflicts
    )
    assert all(d["reason"] == "conflicting_duplicate" for d in dead)
    # the same synthesis, windowed and all-time, as the kept packets folded one by one: so
    # any shard count gives what one shard gives
    got = by_key(read_json_lines(output, "synthesis"))
    assert_same_syntheses(got, expected_records(reference.kept.values(), HOUR_MS))
