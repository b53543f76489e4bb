"""``qis-beam run --source pubsub`` on the BundleBasedDirectRunner against the emulator.

A live swarm (``simulate --live``: current event times, late edge nodes hours behind, every
malformation, duplicates, conflicting resends) plus bad input that only a live topic sees
is published with ``qis-beam publish``; a second subscription captures exactly what was on
the topic. The streaming job runs as its own process (``qis-beam run ... --wait``) and is
stopped by its PID once its outputs have settled. Then:

* the last pane of every window equals a FnApiRunner backfill of the same packets without
  the too-late ones, and the last all-time snapshot of every address equals the backfill's
  all-time synthesis of all of them;
* ``records_in == valid + duplicates + dead_letters`` holds exactly, every dead-letter reason
  and ``too_late`` are counted, and the job survived the bad input.

Counts come from the job's outputs, not Beam counters: the BundleBasedDirectRunner loses
most counter updates of streaming bundles (see TallyStream), and a streaming ``run`` has no
end-of-stream tally. Why the job is deterministic despite wall-clock watermarks is explained
in /work/notes/transports.md ("Pub/Sub on the DirectRunner"): the DirectRunner's Pub/Sub
read sets its watermark to the wall clock after each pull, so with ``--allowed-lateness 10m``
every on-time packet (seconds old) is included and every late edge node's packet (>= 1 h
old) is too late, whatever the machine's speed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from brute_force import assert_close
from conftest import node_key

from qis_beam.cli import main
from qis_beam.proto import packet_pb2
from qis_beam.signing import load_registry
from qis_beam.tfrecords import iter_records, write_record
from qis_beam.transforms.outputs import read_json_lines
from qis_beam.validation import ALL_REASONS, Accepted, ValidationPolicy, validate

pytestmark = pytest.mark.slow

PROJECT = "qis-e2e"
MIN = 60_000
# Job settings: 1 s windows (several per address), lateness far above the seconds an on-time
# packet waits and far below the hour a late edge node's packet lags.
JOB = [
    "--window", "1s",
    "--allowed-lateness", "10m",
    "--early-firing-count", "10",
    "--emit-every", "2s",
    "--flush-every", "1s",
]  # fmt: skip
SETTLE_TIMEOUT_S = 420
QUIET_S = 35  # one empty emulator pull blocks the DirectRunner's only worker for ~30 s


def _admin():
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def _pull_all(subscriber, subscription: str, expected: int, timeout_s: float = 120):
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=10)
        if response.received_messages:
            subscriber.acknowledge(
                subscription=subscription,
                ack_ids=[m.ack_id for m in response.received_messages],
            )
        records += [m.message for m in response.received_messages]
    return records


def _bad_live_input(log_records: list[bytes], registry) -> dict[str, bytes]:
    """Records a live topic can carry that no log of the simulator has."""
    policy = ValidationPolicy(registry=registry)
    valid = next(r for r in log_records if isinstance(validate(r, policy), Accepted))
    forged = packet_pb2.Envelope.FromString(valid)
    forged.signature = node_key(99).sign(forged.payload)  # the right key, a forger's signature
    return {
        "undecodable": b"\xff\xff\xff\xff garbage bytes on the topic",
        "oversize": b"\x0a" * 5000,
        "bad_signature": forged.SerializeToString(),
    }


def _last(records, key):
    last = {}
    for r in records:
        k = key(r)
        if k not in last or r["pane"]["index"] > last[k]["pane"]["index"]:
            last[k] = r
    return last


def _strip_pane(record):
    return {k: v for k, v in record.items() if k != "pane"}


def _outputs(out):
    synthesis = list(read_json_lines(str(out), "synthesis"))
    dead = list(read_json_lines(str(out), "dead_letters"))
    return synthesis, dead


def _settled(out, expect_dead: int, expect_valid: int) -> bool:
    """Every expected dead letter and packet is out and no window's last pane is EARLY.

    Windows may have no ON_TIME pane at all: the read's watermark is the wall clock, so a
    1 s window is often already past when its packets are read; they come as LATE panes.
    """
    synthesis, dead = _outputs(out)
    all_time = _last([r for r in synthesis if r["window_start_ms"] is None], lambda r: r["address"])
    last_panes = _last(
        [r for r in synthesis if r["window_start_ms"] is not None],
        lambda r: (r["address"], r["window_start_ms"]),
    )
    return (
        len(dead) >= expect_dead
        and sum(r["n_packets"] for r in all_time.values()) >= expect_valid
        and all(r["pane"]["timing"] != "EARLY" for r in last_panes.values())
    )


def _write_log(path, records) -> None:
    with open(path, "wb") as handle:
        for record in records:
            write_record(handle, record)


def _default_sigint() -> None:
    """In the job's process before exec: a shell's background job (``.ci/run &``) starts with
    SIGINT ignored, Python keeps an ignored SIGINT, and the job would never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_run_on_pubsub_equals_backfill(pubsub_emulator_host, monkeypatch, tmp_path):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator_host)
    publisher, subscriber = _admin()
    tag = uuid.uuid4().hex[:8]
    topic = f"projects/{PROJECT}/topics/outcomes-{tag}"
    job_sub = f"projects/{PROJECT}/subscriptions/job-{tag}"
    capture_sub = f"projects/{PROJECT}/subscriptions/capture-{tag}"
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=job_sub, topic=topic)
    subscriber.create_subscription(name=capture_sub, topic=topic)

    # A live swarm: current event times, late edge nodes, every malformation, resends.
    swarm, logs = tmp_path / "swarm", tmp_path / "live"
    assert (
        main(
            [
                "simulate", "--live", "--rate", "100/s", "--packets", "300",
                "--nodes", "30", "--addresses", "4", "--seed", "11",
                "--malformed-fraction", "0.04", "--duplicate-fraction", "0.05",
                "--late-fraction", "0.03",
                "--to", f"file://{logs}", "--out", str(swarm),
            ]
        )
        == 0
    )  # fmt: skip
    truth = json.loads((swarm / "truth.json").read_text())["counts"]
    registry = load_registry(swarm / "nodes.txt")
    (log_path,) = logs.glob("packets-live-*.tfrecord")
    swarm_records = list(iter_records(log_path.read_bytes()))
    bad = _bad_live_input(swarm_records, registry)
    _write_log(tmp_path / "bad.tfrecord", list(bad.values()))

    out = tmp_path / "out"
    job_log = open(tmp_path / "job.log", "wb")  # noqa: SIM115 - closed in finally
    job = subprocess.Popen(
        [
            sys.executable, "-m", "qis_beam.cli", "run",
            "--source", "pubsub", "--input-subscription", job_sub,
            "--timestamp-attribute", "event_time_ms",
            "--node-registry", str(swarm / "nodes.txt"),
            "--output", str(out), *JOB,
            "--runner", "BundleBasedDirectRunner", "--wait",
        ],
        stdout=job_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PUBSUB_EMULATOR_HOST": pubsub_emulator_host},
        preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        # Bad input first: the job must go on to process the swarm after it.
        to = f"pubsub://{topic}"
        assert main(["publish", "--input", str(tmp_path / "bad.tfrecord"), "--to", to]) == 0
        published_ms = int(time.time() * 1000)
        assert main(["publish", "--input", str(log_path), "--to", to]) == 0
        published_at = time.monotonic()
        n_records = len(swarm_records) + len(bad)
        captured = _pull_all(subscriber, capture_sub, n_records)
        assert len(captured) == n_records
        # Every message carries its packet's event time (garbage: the time it was sent).
        for message in captured:
            assert int(message.attributes["event_time_ms"]) > 0
        records = [m.data for m in captured]
        assert sorted(records) == sorted(swarm_records + list(bad.values()))

        # What must come out, from the input alone.
        policy = ValidationPolicy(registry=registry)
        first_valid = {}
        for record in records:
            verdict = validate(record, policy)
            if isinstance(verdict, Accepted):
                first_valid.setdefault(verdict.packet.packet_id, verdict.packet)
        too_late_ids = {
            pid.hex()
            for pid, packet in first_valid.items()
            if packet.event_time_ms < published_ms - 30 * MIN
        }
        assert too_late_ids  # the late edge nodes' packets, hours behind the clock
        reasons = dict(truth["expected_summary"]["dead_letters"]["by_reason"])
        for reason in bad:
            reasons[reason] = reasons.get(reason, 0) + 1
        reasons["too_late"] = len(too_late_ids)
        expect_dead = sum(reasons.values())

        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not _settled(out, expect_dead, truth["valid"]):
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the streaming job did not settle"
            time.sleep(3)
        settled_s = time.monotonic() - published_at
        print(f"run --source pubsub: {n_records} records settled {settled_s:.0f}s after publish")
        time.sleep(QUIET_S)  # stragglers: late panes written after the last check
        assert job.poll() is None, "the job stopped by itself"  # bad input did not stop it
    finally:
        # Ctrl-C: `run --wait` cancels the job (the worker may first finish a ~30 s pull).
        job.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        try:
            job.wait(timeout=90)
            print(f"run --source pubsub: stopped {time.monotonic() - interrupted_at:.0f}s after ^C")
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()
        job_log.close()
        subscriber.delete_subscription(subscription=job_sub)
        subscriber.delete_subscription(subscription=capture_sub)
        publisher.delete_topic(topic=topic)

    assert job.returncode == 130, (tmp_path / "job.log").read_text()[-3000:]
    synthesis, dead = _outputs(out)
    by_reason = Counter(d["reason"] for d in dead)
    assert dict(by_reason) == reasons
    assert set(by_reason) == set(ALL_REASONS)  # every dead-letter reason, too_late included
    assert {d["packet_id"] for d in dead if d["reason"] == "too_late"} == too_late_ids
    all_time = _last([r for r in synthesis if r["window_start_ms"] is None], lambda r: r["address"])
    valid = sum(r["n_packets"] for r in all_time.values())
    # Conservation, exactly: records on the topic = valid + exact copies + dead letters.
    not_too_late = sum(n for reason, n in by_reason.items() if reason != "too_late")
    assert n_records == valid + truth["duplicates"] + not_too_late
    assert valid == truth["valid"] == len(first_valid)

    # The backfill of the same packets: the copies the stream dead-lettered as conflicting
    # go (which copy a stream keeps depends on arrival order); for windows, too-late go too.
    conflicting = {
        base64.b64decode(d["record_b64"]) for d in dead if d["reason"] == "conflicting_duplicate"
    }
    kept = [r for r in records if r not in conflicting]
    on_time = [
        r
        for r in kept
        if not (
            isinstance(v := validate(r, policy), Accepted)
            and v.packet.packet_id.hex() in too_late_ids
        )
    ]
    _write_log(tmp_path / "all.tfrecord", kept)
    _write_log(tmp_path / "on_time.tfrecord", on_time)
    batch = {}
    for name in ("all", "on_time"):
        code = main(
            [
                "backfill", "--input", str(tmp_path / f"{name}.tfrecord"),
                "--output", str(tmp_path / f"batch_{name}"),
                "--node-registry", str(swarm / "nodes.txt"), *JOB[:2],  # backfill: --window only
                "--runner", "FnApiRunner",
            ]
        )  # fmt: skip
        assert code == 0
        batch[name] = list(read_json_lines(str(tmp_path / f"batch_{name}"), "synthesis"))

    batch_windows = {
        (r["address"], r["window_start_ms"]): r
        for r in batch["on_time"]
        if r["window_start_ms"] is not None
    }
    last_panes = _last(
        [r for r in synthesis if r["window_start_ms"] is not None],
        lambda r: (r["address"], r["window_start_ms"]),
    )
    assert len(batch_windows) >= 8  # several windows per address
    assert last_panes.keys() == batch_windows.keys()
    for key, record in last_panes.items():
        assert_close(_strip_pane(record), _strip_pane(batch_windows[key]), str(key))
    batch_all_time = {r["address"]: r for r in batch["all"] if r["window_start_ms"] is None}
    assert all_time.keys() == batch_all_time.keys()
    for address, record in all_time.items():
        assert_close(_strip_pane(record), _strip_pane(batch_all_time[address]), str(address))
    summary = json.loads((tmp_path / "batch_all" / "summary.json").read_text())
    assert summary["valid"] == valid and summary["balanced"]
