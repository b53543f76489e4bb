"""``qis-beam run --source kafka`` on Prism with the native Kafka reader, against a real broker.

The slow test publishes a generated swarm plus bad records to a 3-partition topic in two
phases, runs the streaming job (PrismRunner, ``--kafka-reader native``) in a subprocess
until the topic is drained and idle, and compares it with a FnApiRunner backfill of exactly
the published records. The fast tests cover the reader's offset tracker, watermark rules
and the CLI's flag checks.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from brute_force import assert_close

from qis_beam.cli import main
from qis_beam.transforms.kafka_read import (
    END,
    TopicOffsetsTracker,
    TopicWatermark,
    _ReadTopicFn,
    coordinator_not_ready,
    topic_watermark,
    watermark_after_records,
    watermark_when_idle,
)

HOUR_MS = 3_600_000

# --- the reader's building blocks (fast) ----------------------------------------------------


def test_tracker_claims_per_partition_and_checkpoints_where_reading_stands():
    tracker = TopicOffsetsTracker(((0, 5, END), (1, 0, END)))
    assert not tracker.is_bounded()
    assert tracker.try_claim((0, 5)) and tracker.try_claim((0, 9))  # offset gaps are fine
    assert tracker.try_claim((1, 0))
    with pytest.raises(ValueError):
        tracker.try_claim((0, 9))  # not strictly increasing
    assert tracker.try_split(0.5) is None  # fractional splits of [pos, END) are refused
    primary, residual = tracker.try_split(0)
    assert primary == ((0, 5, 10), (1, 0, 1))
    assert residual == ((0, 10, END), (1, 1, END))
    tracker.check_done()  # the primary is fully claimed
    assert not tracker.try_claim((0, 10))  # beyond the primary: the residual owns it


def test_tracker_is_done_only_when_every_range_is_claimed():
    tracker = TopicOffsetsTracker(((0, 0, 3), (1, 0, 2)))
    assert tracker.is_bounded()
    for offset in range(3):
        assert tracker.try_claim((0, offset))
    with pytest.raises(ValueError, match="not fully claimed"):
        tracker.check_done()
    assert tracker.try_claim((1, 1))  # claiming a range's last position ends it
    tracker.check_done()


def test_watermark_trails_records_is_capped_by_the_clock_and_idles_forward():
    now = 10 * HOUR_MS
    assert watermark_after_records(None, now - HOUR_MS, 60_000, now) == now - HOUR_MS - 60_000
    # a forged far-future record timestamp cannot push the watermark past the clock
    assert watermark_after_records(None, now + 100 * HOUR_MS, 60_000, now) == now - 60_000
    # monotonic: an older record never moves it back
    assert watermark_after_records(now - 1000, now - HOUR_MS, 0, now) == now - 1000
    assert watermark_when_idle(now - HOUR_MS, 60_000, now) == now - 60_000
    assert watermark_when_idle(now, 60_000, now) == now
    # the topic's watermark is the minimum; a partition without one holds it back
    assert topic_watermark({0: 5, 1: 3}, [0, 1]) == 3
    assert topic_watermark({0: 5}, [0, 1]) is None
    assert topic_watermark({0: 5, 1: 3}, [0]) == 5  # exhausted partitions do not count


class _Message:
    def __init__(self, partition, offset, ts_ms):
        self._p, self._o, self._ts = partition, offset, ts_ms

    def error(self):
        return None

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return 1, self._ts  # TIMESTAMP_CREATE_TIME

    def value(self):
        return b"r"


class _BusyPartitionZero:
    """A consumer whose partition 0 always has more records and whose partition 1 is empty."""

    def __init__(self, now_ms):
        self.next_offset, self.now_ms = 0, now_ms

    def consume(self, num_messages, timeout):
        batch = [_Message(0, self.next_offset + i, self.now_ms) for i in range(num_messages)]
        self.next_offset += num_messages
        return batch


class _TrackerView:
    def __init__(self, ranges):
        self.ranges, self.deferred = ranges, 0

    def current_restriction(self):
        return self.ranges

    def try_claim(self, position):
        return True

    def defer_remainder(self, delay=None):
        self.deferred += 1


def test_an_empty_partition_does_not_stall_the_watermark_under_steady_traffic():
    """Every bundle stops at its record cap (traffic never pauses on partition 0); the
    caught-up, empty partition 1 must still let the topic's watermark advance."""
    from qis_beam.transforms.kafka_tracking import TrackerAccess, wall_ms

    options = {
        "watermark_delay_ms": 5_000,
        "poll_interval_s": 0.01,
        "max_bundle_records": 50,
        "max_bundle_seconds": 10.0,
        "stop_when_idle_s": None,
        "metadata_timeout_s": 1.0,
        "max_records_per_partition": None,
    }
    fn = _ReadTopicFn("127.0.0.1:1", None, {}, options)
    fn.setup()
    consumer = _BusyPartitionZero(wall_ms())
    fn._reader = lambda topic, tracker: [consumer, {0: 0, 1: 0}]
    fn._high_offsets = lambda consumer, topic, partitions: {p: 0 for p in partitions}
    view = _TrackerView(((0, 0, END), (1, 0, END)))
    watermark = TopicWatermark(({}, None), options["watermark_delay_ms"])
    records = list(fn.read(("t", ((0, 0), (1, 0))), TrackerAccess(view), watermark))
    assert len(records) == 50 and view.deferred == 1  # stopped for the cap, more waiting
    assert watermark.current_watermark() is not None
    assert watermark.current_watermark().micros // 1000 >= consumer.now_ms - 5_000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kafka-reader", "xlang", "--kafka-stop-when-idle", "5s"], "--kafka-stop-when-idle"),
        (["--kafka-expansion-service", "localhost:1", "--kafka-reader", "native"], "xlang"),
        (["--kafka-timestamp-policy", "ProcessingTime"], "record timestamps"),
        (["--kafka-stop-when-idle", "soon"], "--kafka-stop-when-idle"),
    ],
)
def test_run_refuses_flags_the_kafka_reader_would_ignore(extra, message, capsys, tmp_path):
    args = ["run", "--source", "kafka", "--input-topic", "t", "--bootstrap-servers", "h:1"]
    code = main([*args, "--output", str(tmp_path), "--runner", "PrismRunner", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- end to end on a broker (slow) ----------------------------------------------------------

WINDOW_OPTIONS = [
    "--window",
    "10m",
    "--allowed-lateness",
    "1d",
    "--emit-every",
    "10m",
    "--dedupe-ttl",
    "7d",
]


def _bad_records(good: bytes) -> list[bytes]:
    from qis_beam.proto import packet_pb2

    forged = packet_pb2.Envelope.FromString(good)
    signature = bytearray(forged.signature)
    signature[0] ^= 1  # one flipped bit: the signature no longer verifies
    forged.signature = bytes(signature)
    return [
        b"\x00\xffnot an envelope at all",  # undecodable
        b"\x0a" + bytes([0x80, 0x10]) + b"x" * 2048,  # oversize (2 KiB payload field)
        forged.SerializeToString(),  # bad_signature
    ]


def _committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets; {} while the broker's coordinator is not ready."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    except KafkaException as error:
        if coordinator_not_ready(error):
            return {}
        raise
    finally:
        consumer.close()


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "qis-test-offsets"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def _publish(bootstrap: str, topic: str, records: list[tuple[bytes, int | None]]) -> None:
    from qis_beam.transports import open_transport

    with open_transport(f"kafka://{bootstrap}/{topic}") as transport:
        for record, event_ms in records:
            transport.publish(record, event_time_ms=event_ms)


def _stop(process: subprocess.Popen) -> None:
    """Stop the job and the Prism process it started (same process group), by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def kafka_run(kafka_bootstrap, prism_path, postgres_url, tmp_path_factory):
    """Two-phase publish, a native-reader run on Prism writing its snapshots into PostgreSQL,
    and a backfill of the same records."""
    from pg_local import fresh_database

    from qis_beam.sim import SwarmConfig, simulate
    from qis_beam.sim.sending import log_records
    from qis_beam.stack.kafka import create_topic
    from qis_beam.tfrecords import write_record
    from qis_beam.transports import record_meta

    work = tmp_path_factory.mktemp("kafka-run")
    now_ms = int(time.time() * 1000)
    # Recent event times: the reader's idle advance moves the watermark to the clock, and
    # the all-time state (TTL 7d) must not expire in between.
    report = simulate(
        str(work / "swarm"),
        SwarmConfig(
            packets=1500,
            addresses=4,
            nodes=30,
            duplicate_fraction=0.0,  # streaming keeps the first of conflicting copies
            seed=7,
            start_ms=now_ms - 4 * HOUR_MS,
            span_ms=2 * HOUR_MS,
            shards=2,
        ),
    )
    records = list(log_records(report.shard_files))
    # Record timestamp = event time, but never ahead of the clock: Kafka 4 refuses records
    # more than an hour in the future (the simulator's future_event_time packet).
    stamped = []
    for record in records:
        event_ms = record_meta(record).event_time_ms
        stamped.append((record, min(event_ms, now_ms) if event_ms else None))
    half = len(stamped) // 2
    bad = [(r, stamped[half][1]) for r in _bad_records(records[0])]
    phase1, phase2 = stamped[:half] + bad, stamped[half:]
    with open(work / "published.tfrecord", "wb") as handle:
        for record, _ in phase1 + phase2:
            write_record(handle, record)

    topic, group, partitions = f"outcomes-{now_ms}", f"qis-run-{now_ms}", 3
    create_topic(kafka_bootstrap, topic, partitions=partitions)
    _publish(kafka_bootstrap, topic, phase1)
    phase1_ends = _end_offsets(kafka_bootstrap, topic, partitions)

    stream = work / "stream"
    store_url = fresh_database(postgres_url)
    command = [
        sys.executable,
        "-m",
        "qis_beam.cli",
        "run",
        "--source",
        "kafka",
        "--input-topic",
        topic,
        "--bootstrap-servers",
        kafka_bootstrap,
        "--kafka-group-id",
        group,
        "--kafka-stop-when-idle",
        "10s",
        "--output",
        str(stream),
        "--store",
        store_url,
        "--flush-every",
        "1s",
        "--output-shards",
        "2",
        "--node-registry",
        str(work / "swarm" / "nodes.txt"),
        "--early-firing-count",
        "20",
        *WINDOW_OPTIONS,
        "--wait",
        "--runner",
        "PrismRunner",
        f"--prism_location={prism_path}",
        # apache/beam#35771: a split stateful bundle can run one key twice and lose a write.
        "--experiments=prism_disable_sdf_split",
    ]
    log = open(work / "run.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        # Phase 2 only once the job has read (and committed) phase 1 with its bad records.
        deadline = time.monotonic() + 240
        committed = {}
        while time.monotonic() < deadline and process.poll() is None:
            committed = _committed(kafka_bootstrap, topic, group, partitions)
            if all(committed.get(p, -1) >= end for p, end in phase1_ends.items()):
                break
            time.sleep(0.5)
        phase1_read = all(committed.get(p, -1) >= end for p, end in phase1_ends.items())
        _publish(kafka_bootstrap, topic, phase2)
        process.wait(timeout=300)
    finally:
        _stop(process)
        log.close()
    run_log = (work / "run.log").read_text()

    batch = work / "batch"
    assert (
        main(
            [
                "backfill",
                "--input",
                str(work / "published.tfrecord"),
                "--output",
                str(batch),
                "--node-registry",
                str(work / "swarm" / "nodes.txt"),
                *WINDOW_OPTIONS[:2],  # --window: the streaming-only options are refused
                "--runner",
                "FnApiRunner",
            ]
        )
        == 0
    )
    return {
        "work": work,
        "topic": topic,
        "returncode": process.returncode,
        "store_url": store_url,
        "log": run_log,
        "phase1_read": phase1_read,
        "published": len(phase1) + len(phase2),
        "bad": len(bad),
    }


@pytest.mark.slow
def test_kafka_run_on_prism_equals_a_backfill_of_the_same_packets(kafka_run):
    from qis_beam.transforms.outputs import read_json_lines

    assert kafka_run["returncode"] == 0, kafka_run["log"][-3000:]
    assert "submitted the streaming job" in kafka_run["log"]
    # The job read phase 1 -- bad records included -- and went on to read phase 2.
    assert kafka_run["phase1_read"], kafka_run["log"][-3000:]

    work = kafka_run["work"]
    stream = list(read_json_lines(str(work / "stream"), "synthesis"))
    batch = list(read_json_lines(str(work / "batch"), "synthesis"))
    summary = json.loads((work / "batch" / "summary.json").read_text())

    def strip_pane(record):
        return {k: v for k, v in record.items() if k != "pane"}

    batch_by_key = {(r["address"], r["window_start_ms"]): r for r in batch}
    last_panes = {}
    for record in stream:
        key = (record["address"], record["window_start_ms"])
        if key not in last_panes or record["pane"]["index"] > last_panes[key]["pane"]["index"]:
            last_panes[key] = record
    assert last_panes.keys() == batch_by_key.keys()
    windowed = {k: r for k, r in last_panes.items() if k[1] is not None}
    assert windowed, "no windowed synthesis"
    for key, record in windowed.items():
        assert_close(strip_pane(record), strip_pane(batch_by_key[key]), str(key))

    # --output-shards 2: each flush writes a file per shard, both shards in use.
    names = [p.name for p in (work / "stream").glob("synthesis-*.jsonl")]
    assert {n.rsplit("-", 3)[-3] for n in names} == {"00000", "00001"}, names

    # Dead letters: the same reasons and counts as the backfill, named by the topic.
    dead = [d for d in read_json_lines(str(work / "stream"), "dead_letters")]
    ingest_dead = [d for d in dead if d["reason"] != "too_late"]
    by_reason = collections.Counter(d["reason"] for d in ingest_dead)
    expected = {k: v for k, v in summary["dead_letters"]["by_reason"].items() if v}
    assert by_reason == expected
    assert {"undecodable", "oversize", "bad_signature"} <= by_reason.keys()
    assert {d["source"] for d in ingest_dead} == {kafka_run["topic"]}

    # Conservation: every published record is a valid packet or a dead letter (no duplicates
    # were published), and the valid packets are exactly those the windows counted (fixed
    # windows: each packet in exactly one).
    valid = sum(r["n_packets"] for r in windowed.values())
    assert kafka_run["published"] == summary["records_in"]
    assert valid == summary["valid"]
    assert kafka_run["published"] == valid + summary["duplicates"] + len(ingest_dead)
    # The allowed lateness covers every packet: nothing may be flagged too late.
    assert [d for d in dead if d["reason"] == "too_late"] == []


@pytest.mark.slow
def test_kafka_run_all_time_snapshots_equal_the_backfill(kafka_run):
    from qis_beam.transforms.outputs import read_json_lines

    assert kafka_run["returncode"] == 0, kafka_run["log"][-3000:]
    work = kafka_run["work"]
    stream = list(read_json_lines(str(work / "stream"), "synthesis"))
    batch = {
        r["address"]: r
        for r in read_json_lines(str(work / "batch"), "synthesis")
        if r["window_start_ms"] is None
    }
    finals = [r for r in stream if r["window_start_ms"] is None and r["pane"]["is_last"]]
    assert sorted(r["address"] for r in finals) == sorted(batch)
    for record in finals:
        expected = {k: v for k, v in batch[record["address"]].items() if k != "pane"}
        assert_close({k: v for k, v in record.items() if k != "pane"}, expected)


@pytest.mark.slow
def test_the_stream_served_over_grpc_answers_what_the_backfill_computed(kafka_run):
    """The loop closed: Kafka -> run on Prism -> PostgreSQL (upserted while streaming) ->
    qis-beam serve -> the node's client; every address's answer equals the backfill."""
    from qis_beam.client import IntelligenceClient
    from qis_beam.service.server import ServeConfig, start_server
    from qis_beam.store import open_store
    from qis_beam.transforms.outputs import read_json_lines

    assert kafka_run["returncode"] == 0, kafka_run["log"][-3000:]
    batch = list(read_json_lines(str(kafka_run["work"] / "batch"), "synthesis"))
    all_time = {r["address"]: r for r in batch if r["window_start_ms"] is None}
    windows = collections.Counter(r["address"] for r in batch if r["window_start_ms"] is not None)

    def fields(record):
        return {k: v for k, v in record.items() if k not in ("pane", "provenance")}

    store = open_store(kafka_run["store_url"])
    server = start_server(store, ServeConfig(port=0))
    try:
        with IntelligenceClient(f"127.0.0.1:{server.port}") as client:
            for address, expected in all_time.items():
                answer = client.synthesis(address).to_record()
                assert_close(fields(answer), fields(expected), str(address))
                assert len(client.windows(address)) == windows[address], address
    finally:
        server.stop()
        store.close()
