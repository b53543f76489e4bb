"""The ``qis-beam run --source kafka`` end-to-end scenario, shared by every runner's tests.

One scenario (``prepare``): a generated swarm with recent event times plus three bad records,
published to a 3-partition topic in two phases; the job (``start_run``, any runner's Beam
arguments) reads phase 1 -- bad records included -- commits its group offsets, then phase 2,
and ends once the topic is idle (``--kafka-stop-when-idle``). ``backfill`` runs the FnApiRunner
over exactly the published records, and the ``check_*`` functions compare the two: windowed
synthesis, dead letters, conservation, all-time snapshots, and the PostgreSQL store served by
``qis-beam serve`` to ``qis_beam.client``.

Used by tests/test_kafka_run.py (Prism) and tests/test_flink.py (Flink).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from brute_force import assert_close

from qis_beam.cli import main
from qis_beam.transforms.kafka_read import coordinator_not_ready

HOUR_MS = 3_600_000
PARTITIONS = 3

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

Published = list[tuple[bytes, "int | None"]]  # (record, Kafka record timestamp in ms)


def bad_records(good: bytes) -> list[bytes]:
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


def committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int]:
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


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "qis-test-offsets"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def publish(bootstrap: str, topic: str, records: Published) -> None:
    from qis_beam.transports import open_transport

    with open_transport(f"kafka://{bootstrap}/{topic}") as transport:
        for record, event_ms in records:
            transport.publish(record, event_time_ms=event_ms)


def dump_stacks(process: subprocess.Popen, wait_s: float = 3.0) -> None:
    """Ask a launcher that seems stuck for every thread's stack (``qis-beam`` prints them on
    SIGUSR1), into its log, before it is stopped."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGUSR1)
        time.sleep(wait_s)


def stop(process: subprocess.Popen) -> None:
    """Stop the job's launcher and what it started in its process group (Prism, the Flink
    job server), by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclasses.dataclass
class Scenario:
    work: Path
    bootstrap: str
    topic: str
    group: str
    phase1: Published  # the first half of the swarm + the bad records
    phase2: Published
    bad: int

    @property
    def registry(self) -> str:
        return str(self.work / "swarm" / "nodes.txt")

    @property
    def published(self) -> Path:
        return self.work / "published.tfrecord"

    def write_published(self, *batches: Published) -> None:
        """The log the backfill reads: exactly the records published, in order."""
        from qis_beam.tfrecords import write_record

        with open(self.published, "wb") as handle:
            for batch in batches:
                for record, _ in batch:
                    write_record(handle, record)


def prepare(work: Path, bootstrap: str, packets: int = 1500, seed: int = 7) -> Scenario:
    """Simulate a swarm with recent event times, split it in two phases (bad records in
    phase 1), create the topic and write the log of both phases for the backfill."""
    from qis_beam.sim import SwarmConfig, simulate
    from qis_beam.sim.sending import log_records
    from qis_beam.stack.kafka import create_topic
    from qis_beam.transports import record_meta

    now_ms = int(time.time() * 1000)
    # Recent event times: the reader's idle advance moves the watermark to the clock, and
    # the all-time state (TTL 7d) must not expire in between.
    report = simulate(
        str(work / "swarm"),
        SwarmConfig(
            packets=packets,
            addresses=4,
            nodes=30,
            duplicate_fraction=0.0,  # streaming keeps the first of conflicting copies
            seed=seed,
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
    bad = [(r, stamped[half][1]) for r in bad_records(records[0])]
    scenario = Scenario(
        work=work,
        bootstrap=bootstrap,
        topic=f"outcomes-{now_ms}",
        group=f"qis-run-{now_ms}",
        phase1=stamped[:half] + bad,
        phase2=stamped[half:],
        bad=len(bad),
    )
    scenario.write_published(scenario.phase1, scenario.phase2)
    create_topic(bootstrap, scenario.topic, partitions=PARTITIONS)
    return scenario


def run_command(
    scenario: Scenario,
    store_url: str,
    runner_args: Sequence[str],
    stream: str = "stream",
    stop_when_idle: str | None = "10s",
) -> list[str]:
    """``qis-beam run`` on the scenario's topic; ``stop_when_idle=None``: an unbounded job."""
    bounded = [] if stop_when_idle is None else ["--kafka-stop-when-idle", stop_when_idle]
    return [
        sys.executable,
        "-m",
        "qis_beam.cli",
        "run",
        "--source",
        "kafka",
        "--input-topic",
        scenario.topic,
        "--bootstrap-servers",
        scenario.bootstrap,
        "--kafka-group-id",
        scenario.group,
        *bounded,
        "--output",
        str(scenario.work / stream),
        "--store",
        store_url,
        "--flush-every",
        "1s",
        "--output-shards",
        "2",
        "--node-registry",
        scenario.registry,
        "--early-firing-count",
        "20",
        *WINDOW_OPTIONS,
        "--wait",
        *runner_args,
    ]


def start_run(command: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """The job's launcher in its own session (``stop`` ends the whole group by its PID)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def wait_committed(
    scenario: Scenario,
    ends: dict[int, int],
    process: subprocess.Popen,
    timeout: float,
) -> bool:
    """True once the group's committed offsets reach ``ends`` on every partition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        offsets = committed(scenario.bootstrap, scenario.topic, scenario.group, PARTITIONS)
        if all(offsets.get(p, -1) >= end for p, end in ends.items()):
            return True
        time.sleep(0.5)
    offsets = committed(scenario.bootstrap, scenario.topic, scenario.group, PARTITIONS)
    return all(offsets.get(p, -1) >= end for p, end in ends.items())


def stored_packets(store_url: str) -> int:
    """Packets counted by the store's all-time rows (0 before the first upsert)."""
    from qis_beam.store import open_store

    with open_store(store_url, create=True) as store:
        return sum((store.latest(a) or {}).get("n_packets", 0) for a in store.addresses())


def valid_packets(scenario: Scenario, records: Published, name: str) -> int:
    """How many of ``records`` are valid packets: a FnApiRunner backfill of just those."""
    from qis_beam.tfrecords import write_record

    log = scenario.work / f"{name}.tfrecord"
    with open(log, "wb") as handle:
        for record, _ in records:
            write_record(handle, record)
    out = scenario.work / name
    args = ["backfill", "--input", str(log), "--output", str(out), "--node-registry"]
    assert main([*args, scenario.registry, "--runner", "FnApiRunner", "--quiet"]) == 0
    return json.loads((out / "summary.json").read_text())["valid"]


def wait_stored(store_url: str, packets: int, process: subprocess.Popen, timeout: float) -> bool:
    """True once the store's all-time rows count ``packets`` packets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if stored_packets(store_url) >= packets:
            return True
        time.sleep(0.5)
    return stored_packets(store_url) >= packets


def two_phase_run(
    scenario: Scenario,
    store_url: str,
    runner_args: Sequence[str],
    gate: str = "committed",
    stop_when_idle: str | None = "10s",
    phase1_timeout: float = 240,
    finish_timeout: float = 300,
    cleanup=None,
    until=None,
) -> dict:
    """Publish phase 1, run the job until it has read phase 1, publish phase 2, wait for the
    job to end (idle topic) -- or, for an unbounded job (``stop_when_idle=None``), until
    ``until()`` is true. ``cleanup()`` runs after the launcher stopped (e.g. cancelling what
    it left on a cluster).

    ``gate`` says how "read phase 1" is seen: ``committed`` -- the group's offsets reached
    phase 1's end (runners that commit when a bundle's output is durable: Prism) -- or
    ``stored`` -- the store counts every valid packet of phase 1 (Flink commits only when a
    checkpoint completes; its offsets are checked at the end instead)."""
    phase1_valid = valid_packets(scenario, scenario.phase1, "phase1") if gate == "stored" else 0
    publish(scenario.bootstrap, scenario.topic, scenario.phase1)
    phase1_ends = end_offsets(scenario.bootstrap, scenario.topic, PARTITIONS)
    log_path = scenario.work / "run.log"
    command = run_command(scenario, store_url, runner_args, stop_when_idle=stop_when_idle)
    process = start_run(command, log_path)
    started = time.monotonic()
    timings = {}
    try:
        # Phase 2 only once the job has read phase 1 with its bad records.
        if gate == "committed":
            phase1_read = wait_committed(scenario, phase1_ends, process, phase1_timeout)
        else:
            phase1_read = wait_stored(store_url, phase1_valid, process, phase1_timeout)
        timings["phase1_read_s"] = time.monotonic() - started
        if not phase1_read:
            dump_stacks(process)
        publish(scenario.bootstrap, scenario.topic, scenario.phase2)
        if stop_when_idle is None:
            deadline = time.monotonic() + finish_timeout
            while not until() and time.monotonic() < deadline and process.poll() is None:
                time.sleep(1)
            timings["converged_s"] = time.monotonic() - started
        else:
            process.wait(timeout=finish_timeout)
            timings["ended_s"] = time.monotonic() - started
    finally:
        stop(process)
        if cleanup is not None:
            cleanup()
    return {
        "work": scenario.work,
        "topic": scenario.topic,
        "returncode": process.returncode,
        "unbounded": stop_when_idle is None,  # stopped by the caller, not ended by itself
        "store_url": store_url,
        "log": log_path.read_text(),
        "phase1_read": phase1_read,
        "published": len(scenario.phase1) + len(scenario.phase2),
        "bad": scenario.bad,
        "timings": timings,
        "committed": committed(scenario.bootstrap, scenario.topic, scenario.group, PARTITIONS),
        "end_offsets": end_offsets(scenario.bootstrap, scenario.topic, PARTITIONS),
    }


def backfill(scenario: Scenario, out: str = "batch") -> Path:
    """FnApiRunner backfill of exactly the published records."""
    batch = scenario.work / out
    args = [
        "backfill",
        "--input",
        str(scenario.published),
        "--output",
        str(batch),
        "--node-registry",
        scenario.registry,
        *WINDOW_OPTIONS[:2],  # --window: the streaming-only options are refused
        "--runner",
        "FnApiRunner",
        "--quiet",
    ]
    assert main(args) == 0
    return batch


# --- what a finished run must show ---------------------------------------------------------


def _without(record: dict, *fields: str) -> dict:
    return {k: v for k, v in record.items() if k not in fields}


def check_stream_equals_backfill(run: dict) -> None:
    """Windowed synthesis (last pane of every window), dead letters and conservation."""
    from qis_beam.transforms.outputs import read_json_lines

    assert run["unbounded"] or run["returncode"] == 0, run["log"][-3000:]
    assert "submitted the streaming job" in run["log"]
    # The job read phase 1 -- bad records included -- and went on to read phase 2.
    assert run["phase1_read"], run["log"][-3000:]

    work = run["work"]
    stream = list(read_json_lines(str(work / "stream"), "synthesis"))
    batch = list(read_json_lines(str(work / "batch"), "synthesis"))
    summary = json.loads((work / "batch" / "summary.json").read_text())

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
        assert_close(_without(record, "pane"), _without(batch_by_key[key], "pane"), str(key))

    # --output-shards 2: each flush writes a file per shard, both shards in use.
    names = [p.name for p in (work / "stream").glob("synthesis-*.jsonl")]
    assert {n.rsplit("-", 3)[-3] for n in names} == {"00000", "00001"}, names

    # Dead letters: the same reasons and counts as the backfill, named by the topic.
    dead = list(read_json_lines(str(work / "stream"), "dead_letters"))
    ingest_dead = [d for d in dead if d["reason"] != "too_late"]
    by_reason = collections.Counter(d["reason"] for d in ingest_dead)
    expected = {k: v for k, v in summary["dead_letters"]["by_reason"].items() if v}
    assert by_reason == expected
    assert {"undecodable", "oversize", "bad_signature"} <= by_reason.keys()
    assert {d["source"] for d in ingest_dead} == {run["topic"]}

    # Conservation: every published record is a valid packet or a dead letter (no duplicates
    # were published), and the valid packets are exactly those the windows counted (fixed
    # windows: each packet in exactly one).
    valid = sum(r["n_packets"] for r in windowed.values())
    assert run["published"] == summary["records_in"]
    assert valid == summary["valid"]
    assert run["published"] == valid + summary["duplicates"] + len(ingest_dead)
    # The allowed lateness covers every packet: nothing may be flagged too late.
    assert [d for d in dead if d["reason"] == "too_late"] == []


def check_all_time_snapshots(run: dict) -> None:
    """Every address's final all-time snapshot equals the backfill's all-time record."""
    from qis_beam.transforms.outputs import read_json_lines

    assert run["unbounded"] or run["returncode"] == 0, run["log"][-3000:]
    work = run["work"]
    stream = list(read_json_lines(str(work / "stream"), "synthesis"))
    batch = {
        r["address"]: r
        for r in read_json_lines(str(work / "batch"), "synthesis")
        if r["window_start_ms"] is None
    }
    snapshots = [r for r in stream if r["window_start_ms"] is None]
    if run["unbounded"]:  # still running when stopped: the latest snapshot of each address
        latest: dict[str, dict] = {}
        for r in snapshots:
            if (
                r["pane"]["index"]
                >= latest.get(r["address"], {"pane": {"index": -1}})["pane"]["index"]
            ):
                latest[r["address"]] = r
        finals = list(latest.values())
    else:
        finals = [r for r in snapshots if r["pane"]["is_last"]]
    assert sorted(r["address"] for r in finals) == sorted(batch)
    for record in finals:
        assert_close(_without(record, "pane"), _without(batch[record["address"]], "pane"))


class Serve:
    """``qis-beam serve --store URL --port 0`` as a process; stopped by its PID."""

    def __init__(self, store_url: str, log_path: Path, timeout: float = 60):
        self._log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qis_beam.cli", "serve", "--store", store_url, "--port", "0"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        self.target = None
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"serving \S+ on (\S+):(\d+)", log_path.read_text())
            if found:
                self.target = f"127.0.0.1:{found.group(2)}"
                break
            time.sleep(0.2)
        if self.target is None:
            self.close()
            raise AssertionError(f"qis-beam serve did not start: {log_path.read_text()[-2000:]}")

    def close(self) -> None:
        stop(self.process)
        self._log.close()

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_served_answers(run: dict, store_url: str | None = None, batch_dir: str = "batch"):
    """The loop closed: the store the stream upserted into -> ``qis-beam serve`` -> the node's
    client; every address's answer equals the backfill (all-time record, window count)."""
    from qis_beam.client import IntelligenceClient
    from qis_beam.transforms.outputs import read_json_lines

    batch = list(read_json_lines(str(run["work"] / batch_dir), "synthesis"))
    all_time = {r["address"]: r for r in batch if r["window_start_ms"] is None}
    windows = collections.Counter(r["address"] for r in batch if r["window_start_ms"] is not None)
    assert all_time, "the backfill found no address"

    with Serve(store_url or run["store_url"], run["work"] / "serve.log") as served:
        with IntelligenceClient(served.target) as client:
            for address, expected in all_time.items():
                answer = client.synthesis(address).to_record()
                assert_close(
                    _without(answer, "pane", "provenance"),
                    _without(expected, "pane", "provenance"),
                    str(address),
                )
                assert len(client.windows(address)) == windows[address], address
