"""``qis-beam stack``: pinned artifacts, the local engines, their fixtures and profiles.

Fast tests check the pins, digest refusal, PID safety and the ``local-*`` profiles without a
stack; ``slow`` tests start real engines (Kafka, the Pub/Sub emulator, PostgreSQL, Flink,
Prism) on free loopback ports in a tmp state dir and stop them by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    PortableOptions,
)

from qis_beam import stack
from qis_beam.runners.profiles import LOCAL_FLINK_VERSION, missing_options, profile_args
from qis_beam.stack.digests import DigestMismatch, sha256_of
from qis_beam.stack.download import fetch_file
from qis_beam.stack.flink import LOCAL_JVM_OPTIONS, fresh_scratch, registered_taskmanagers
from qis_beam.stack.pins import pins
from qis_beam.stack.procs import alive, spawn, start_ticks, stop
from qis_beam.stack.state import Proc

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qis_beam.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def gone(pid: int) -> bool:
    return start_ticks(pid) is None


# --- pins ------------------------------------------------------------------------------------


def test_pins_name_a_digest_for_every_download():
    spec = pins()
    assert spec["flink"]["version"].startswith(LOCAL_FLINK_VERSION + ".")
    assert LOCAL_FLINK_VERSION in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert {f["role"] for f in spec["flink"]["files"]} == {"libraries", "scripts"}
    for f in spec["flink"]["files"]:
        assert SHA256.match(f["sha256"]) and f["url"].startswith("https://")
        assert f["url"].endswith("/" + f["name"]) and spec["flink"]["version"] in f["name"]
    kafka = spec["kafka"]
    assert f"org.apache.kafka:kafka_{kafka['scala']}:{kafka['version']}" in kafka["dependencies"]
    assert f"kafka_{kafka['scala']}-{kafka['version']}.jar" in kafka["jars"]
    assert all(SHA256.match(d) for d in kafka["jars"].values())
    # Prism is built from the same Beam release as the Python SDK.
    assert spec["prism"]["version"] == "v" + beam.__version__
    assert re.match(r"^h1:[A-Za-z0-9+/]{43}=$", spec["prism"]["h1"])
    item = spec["unavailable"]["kafka_expansion_service"]
    assert beam.__version__ in item["artifact"] and item["reason"] and item["supply"]
    # The job server is shaded from the runner for the stack's Flink minor version.
    server = spec["flink_job_server"]
    assert server["flink"] == spec["flink"]["minor"] == LOCAL_FLINK_VERSION
    assert server["dependencies"] == [
        f"org.apache.beam:beam-runners-flink-{server['flink']}:{server['version']}"
    ]
    assert f"beam-runners-flink-{server['flink']}-{server['version']}.jar" in server["jars"]
    assert f"beam-runners-java-job-service-{server['version']}.jar" in server["jars"]
    assert all(SHA256.match(d) for d in server["jars"].values())


# --- digests -----------------------------------------------------------------------------------


def test_download_keeps_only_a_file_with_the_pinned_digest(tmp_path):
    source = tmp_path / "artifact.bin"
    source.write_bytes(b"engine bytes" * 1000)
    good = sha256_of(source)
    bad = "0" * 64
    dest = tmp_path / "cache" / "artifact.bin"

    with pytest.raises(DigestMismatch) as refused:
        fetch_file(source.as_uri(), dest, bad)
    message = str(refused.value)
    assert "\n" not in message
    assert str(dest) in message and bad in message and good in message
    assert not dest.exists() and not list(dest.parent.glob("*.part"))

    assert fetch_file(source.as_uri(), dest, good) is True
    assert fetch_file("https://invalid.invalid/never-fetched", dest, good) is False  # cached
    dest.write_bytes(b"tampered")
    with pytest.raises(DigestMismatch, match="refusing .*artifact.bin"):
        fetch_file(source.as_uri(), dest, good)


def test_a_kafka_cluster_id_never_starts_with_a_dash(monkeypatch):
    """Kafka's storage tool reads ``-t -x...`` as an option with no id (a CI run lost its
    broker so): an id that would start with "-" is drawn again, as Kafka's own Uuid does."""
    from qis_beam.stack import kafka

    draws = iter([uuid.UUID(bytes=b"\xf8" + b"\0" * 15), uuid.UUID(int=1 << 100)])
    monkeypatch.setattr(kafka.uuid, "uuid4", lambda: next(draws))
    cluster_id = kafka.random_cluster_id()
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cluster_id), cluster_id
    assert next(draws, None) is None  # the dash-led draw was replaced by the next one


@pytest.mark.slow
def test_fetch_refuses_a_tampered_cached_kafka_jar(tmp_path):
    env = {"QIS_BEAM_CACHE": str(tmp_path / "cache")}
    first = cli("stack", "fetch", "--only", "kafka", env=env)
    assert first.returncode == 0, first.stderr
    assert "kafka 4.4.0: downloaded, verified" in first.stdout
    again = cli("stack", "fetch", "--only", "kafka", env=env)
    assert again.returncode == 0 and "kafka 4.4.0: cached, verified" in again.stdout

    jar = tmp_path / "cache" / "kafka-4.4.0" / "lib" / "kafka-clients-4.4.0.jar"
    with open(jar, "ab") as f:
        f.write(b"\0")
    tampered = cli("stack", "fetch", "--only", "kafka", env=env)
    assert tampered.returncode == 1
    lines = tampered.stderr.strip().splitlines()
    assert len(lines) == 1, tampered.stderr
    expected = pins()["kafka"]["jars"]["kafka-clients-4.4.0.jar"]
    assert lines[0] == (
        f"qis-beam stack fetch: refusing {jar}: SHA-256 {sha256_of(jar)} does not match "
        f"the pinned {expected} (qis_beam/stack/pins.toml)"
    )


@pytest.mark.slow
def test_second_fetch_is_instant_and_verified():
    cli("stack", "fetch")  # cold on a new machine; .ci/run has warmed the cache already
    start = time.monotonic()
    warm = cli("stack", "fetch")
    took = time.monotonic() - start
    assert warm.returncode == 0, warm.stderr
    for piece in ("flink 1.19", "flink_job_server 2.62.0", "kafka 4.4.0", "prism v2.77.0"):
        assert re.search(rf"^{re.escape(piece)}\S*: cached, verified", warm.stdout, re.M)
    assert "kafka_expansion_service: not available" in warm.stdout
    assert took < 20, f"warm fetch took {took:.1f}s"


def test_job_server_is_published_only_from_locked_jars_and_rechecked(tmp_path, monkeypatch):
    """The shaded jar is built from exactly the locked jars, and re-hashed when reused."""
    import hashlib

    from qis_beam.stack import jobserver
    from qis_beam.stack.fetch import FetchError

    runner = b"runner classes"
    spec = {
        **pins()["flink_job_server"],
        "jars": {"runner.jar": hashlib.sha256(runner).hexdigest()},
    }
    monkeypatch.setattr(jobserver, "pins", lambda: {"flink_job_server": spec})
    extra: list[str] = []

    def fake_maven(label, dependencies, plugin, main_class, lib, jar):
        lib.mkdir(parents=True)
        (lib / "runner.jar").write_bytes(runner)
        for name in extra:
            (lib / name).write_bytes(b"?")
        jar.write_bytes(b"shaded " + runner)
        return sorted(lib.glob("*.jar"))

    monkeypatch.setattr(jobserver, "resolve_and_shade", fake_maven)
    cache = tmp_path / "cache"
    extra.append("surprise.jar")
    with pytest.raises(FetchError, match=r"unexpected \['surprise.jar'\], missing \[\]"):
        jobserver.fetch_job_server(cache)
    assert not jobserver.jar_path(cache).parent.exists() and not list(cache.iterdir())

    extra.clear()
    built = jobserver.fetch_job_server(cache)
    assert built.downloaded and built.path == jobserver.jar_path(cache)
    assert sorted(p.name for p in built.path.parent.iterdir()) == [
        ".qis-beam-complete.json",
        built.path.name,
    ]
    assert jobserver.cached_jar(cache) == built.path
    assert jobserver.fetch_job_server(cache).downloaded is False
    built.path.write_bytes(b"tampered")
    with pytest.raises(DigestMismatch, match="refusing .*job-server"):
        jobserver.fetch_job_server(cache)


# --- processes -----------------------------------------------------------------------------


def test_a_flink_start_empties_scratch_and_keeps_checkpoints_and_savepoints(tmp_path):
    blob = tmp_path / "tmp" / "tm_qis-tm-1" / "blobStorage" / "job_1" / "blob_p-1"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"a finished job's jar")
    (tmp_path / "web-upload").mkdir()
    (tmp_path / "web-upload" / "old.jar").write_bytes(b"jar")
    kept = [tmp_path / "checkpoints" / "chk-1" / "_metadata", tmp_path / "savepoints" / "sp-1"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"state")

    fresh_scratch(tmp_path)

    for sub in ("tmp", "web-tmp", "web-upload"):
        assert list((tmp_path / sub).iterdir()) == [], sub
    assert (tmp_path / "log").is_dir()
    assert all(path.read_bytes() == b"state" for path in kept)


def test_stop_never_signals_a_reused_pid(tmp_path):
    sleeper = spawn("sleeper", ["sleep", "60"], tmp_path / "sleep.log")
    try:
        impostor = Proc("x", sleeper.pid, sleeper.pgid, sleeper.start_ticks + 1, "", [])
        assert not alive(impostor) and stop(impostor) is False
        assert alive(sleeper)
        assert stop(sleeper, timeout=5) is True
        assert gone(sleeper.pid)
    finally:
        if alive(sleeper):
            os.killpg(sleeper.pgid, signal.SIGKILL)


@pytest.mark.slow
def test_tied_pieces_stop_when_the_caller_is_killed(tmp_path):
    """The fixtures' pieces do not outlive a pytest run killed before its teardown."""
    script = (
        "import os, signal, sys\n"
        "from qis_beam import stack\n"
        "started = stack.up(sys.argv[1], only=['prism'], tie_to_caller=True)\n"
        "print(started['prism'].piece.procs[0].pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid)
    assert stack.down(tmp_path) == {"prism": []}  # recorded, but nothing left to stop


def test_bad_arguments_are_one_line_and_exit_2():
    result = cli("stack", "up", "--only", "kafka,zookeeper")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "qis-beam stack up: argument --only: unknown piece zookeeper; "
        "choose from postgres,pubsub,kafka,prism,flink"
    )


@pytest.mark.slow
def test_a_piece_that_cannot_start_fails_with_one_line_naming_its_log(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = cli(
            "stack",
            "up",
            "--only",
            "postgres",
            "--postgres-port",
            str(port),
            "--state-dir",
            str(tmp_path),
            timeout=180,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert len(last) == 1, result.stderr
    log = tmp_path / "postgres" / "postgres.log"
    assert last[0].startswith("qis-beam stack up: postgres did not come up (")
    assert last[0].endswith(f"; log: {log}")
    assert "could not" in log.read_text()  # PostgreSQL's own reason is in the log
    assert stack.status(tmp_path) == {}  # nothing left recorded (or running)
    stack.down(tmp_path, purge=True)


# --- profiles --------------------------------------------------------------------------------


def test_local_profiles_ask_for_what_no_stack_provides(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QIS_STACK_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("QIS_BEAM_CACHE", str(tmp_path / "empty-cache"))  # no fetched jar
    monkeypatch.delenv("QIS_FLINK_JOB_SERVER_JAR", raising=False)
    flink = profile_args("local-flink", streaming=True)
    assert missing_options("local-flink", flink) == ["flink_master", "flink_job_server_jar"]
    assert missing_options("local-prism", profile_args("local-prism", True)) == ["job_endpoint"]

    monkeypatch.setenv("QIS_FLINK_JOB_SERVER_JAR", "/opt/jars/job-server.jar")
    options = PipelineOptions(profile_args("local-flink", streaming=False))
    assert options.view_as(FlinkRunnerOptions).flink_job_server_jar == "/opt/jars/job-server.jar"
    jvm = options.get_all_options()["job_server_jvm_properties"]
    assert jvm == [
        "--add-opens=java.base/java.lang=ALL-UNNAMED",
        "--add-opens=java.base/java.nio=ALL-UNNAMED",
        "--add-opens=java.base/java.util=ALL-UNNAMED",
    ]

    from qis_beam.cli import main

    monkeypatch.setenv("QIS_FLINK_JOB_SERVER_JAR", "")
    capsys.readouterr()
    args = ["backfill", "--input", "x", "--output", str(tmp_path / "o")]
    assert main([*args, "--profile", "local-flink"]) == 2
    assert capsys.readouterr().err == (
        "qis-beam backfill: --profile local-flink needs --flink_master, --flink_job_server_jar\n"
    )
    assert not (tmp_path / "o").exists()


# --- the whole stack ---------------------------------------------------------------------------


def kafka_round_trip(bootstrap: str) -> None:
    from confluent_kafka import Consumer, Producer

    from qis_beam.stack.kafka import create_topic

    topic = f"qis-stack-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}
    for k, v in sent.items():
        producer.produce(topic, key=k, value=v, timestamp=1_767_225_600_000)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    got = {}
    deadline = time.monotonic() + 120
    try:
        while len(got) < len(sent) and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                got[message.key()] = message.value()
                assert message.timestamp()[1] == 1_767_225_600_000
    finally:
        consumer.close()
    assert got == sent, f"consumed {len(got)} of {len(sent)} records from {topic}"


def pubsub_round_trip(host: str) -> None:
    def call(method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://{host}/v1/{path}",
            method=method,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    name = f"probe-{uuid.uuid4().hex[:8]}"
    topic, subscription = (
        f"projects/qis-test/topics/{name}",
        f"projects/qis-test/subscriptions/{name}",
    )
    call("PUT", topic)
    call("PUT", subscription, {"topic": topic})
    call(
        "POST",
        f"{topic}:publish",
        {"messages": [{"data": "aGVsbG8=", "attributes": {"event_time_ms": "1"}}]},
    )
    pulled = call("POST", f"{subscription}:pull", {"maxMessages": 5})
    assert [m["message"]["data"] for m in pulled["receivedMessages"]] == ["aGVsbG8="]


def postgres_round_trip(url: str) -> None:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("CREATE TEMP TABLE probe (x int)")
        conn.execute("INSERT INTO probe VALUES (42)")
        assert conn.execute("SELECT sum(x) FROM probe").fetchone()[0] == 42
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("qis", "qis")


def flink_overview(rest_url: str) -> dict:
    with urllib.request.urlopen(f"{rest_url}/overview", timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_stack_up_status_and_down_stops_exactly_its_processes(tmp_path, monkeypatch):
    unrelated = subprocess.Popen(["sleep", "600"], start_new_session=True)
    state = tmp_path / "state"
    try:
        up = cli(
            "stack",
            "up",
            "--only",
            "kafka,pubsub,postgres,flink",
            "--state-dir",
            str(state),
            timeout=900,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        for piece in ("kafka", "pubsub", "postgres", "flink"):
            assert re.search(rf"^  {piece}\s+healthy after [0-9.]+s", up.stdout, re.M), up.stdout

        status = cli("stack", "status", "--state-dir", str(state), "--json")
        assert status.returncode == 0, status.stderr
        rows = json.loads(status.stdout)["pieces"]
        assert set(rows) == {"kafka", "pubsub", "postgres", "flink"}
        assert all(row["alive"] for row in rows.values())
        roles = [p["role"] for p in rows["flink"]["procs"]]
        assert roles == ["jobmanager", "sdk-worker-pool", "taskmanager-1"]
        # Both JVMs run with the local stack's flags (C1 only, serial GC).
        for proc in rows["flink"]["procs"]:
            if proc["role"] != "sdk-worker-pool":
                argv = Path(f"/proc/{proc['pid']}/cmdline").read_bytes().split(b"\0")
                assert {o.encode() for o in LOCAL_JVM_OPTIONS.split()} <= set(argv), proc

        kafka_round_trip(rows["kafka"]["endpoints"]["bootstrap"])
        pubsub_round_trip(rows["pubsub"]["endpoints"]["host"])
        postgres_round_trip(rows["postgres"]["endpoints"]["url"])
        rest = rows["flink"]["endpoints"]["rest"]
        info = flink_overview(rest)
        assert (info["taskmanagers"], info["slots-total"]) == (1, 2)
        assert info["flink-version"] == pins()["flink"]["version"]

        # The local-flink profile submits to this cluster.
        monkeypatch.setenv("QIS_STACK_DIR", str(state))
        flink_args = PipelineOptions(profile_args("local-flink", streaming=True))
        assert flink_args.view_as(FlinkRunnerOptions).flink_master == rest.removeprefix("http://")
        # Streaming stays on LOOPBACK; batch runs its Python in the stack's worker pool.
        assert flink_args.view_as(PortableOptions).environment_type == "LOOPBACK"
        batch = PipelineOptions(profile_args("local-flink", streaming=False))
        pool = rows["flink"]["endpoints"]["sdk_worker_pool"]
        assert batch.view_as(PortableOptions).environment_type == "EXTERNAL"
        assert batch.view_as(PortableOptions).environment_config == pool

        # Recovery drill: kill -9 the TaskManager, start a new one, the cluster has 2 slots again.
        old_tm = rows["flink"]["procs"][2]["pid"]
        os.kill(old_tm, signal.SIGKILL)
        new_tm = stack.add_taskmanager(state)
        assert gone(old_tm) and new_tm.role == "taskmanager-2"
        # The new TaskManager registered with its 2 slots (the dead one may still be listed
        # until its heartbeat times out).
        assert registered_taskmanagers(rest)["qis-tm-2"] == 2

        recorded = [p.pid for piece in stack.status(state).values() for p in piece.procs]
        assert new_tm.pid in recorded and old_tm not in recorded
        down = cli("stack", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        stopped = [
            int(pid)
            for pid in re.findall(
                r"\d+",
                " ".join(
                    line.split("stopped PIDs", 1)[1]
                    for line in down.stdout.splitlines()
                    if "stopped PIDs" in line
                ),
            )
        ]
        assert sorted(stopped) == sorted(recorded)
        assert all(gone(pid) for pid in recorded)
        assert unrelated.poll() is None, "stack down must not touch other processes"
        assert cli("stack", "status", "--state-dir", str(state)).stdout.startswith("nothing")
    finally:
        stack.down(state, purge=True)
        unrelated.kill()
        unrelated.wait()


@pytest.mark.slow
def test_backfill_runs_on_the_stack_prism_with_the_local_prism_profile(tmp_path, monkeypatch):
    """`backfill --profile local-prism` finds the stack's Prism job service and computes
    there what the packets folded one by one give."""
    from brute_force import assert_same_syntheses, by_key, expected_records
    from conftest import T0_MS, make_record, node_key

    from qis_beam.cli import main
    from qis_beam.tfrecords import write_record
    from qis_beam.transforms.outputs import read_json_lines

    state = tmp_path / "state"
    records = [
        make_record(
            node_key(i % 3),
            packet_id=i.to_bytes(16, "big"),
            approach_id=f"a{i % 2}",
            outcome_type=1 + i % 4,
            event_time_ms=T0_MS + i * 600_000,
            emit_time_ms=T0_MS + i * 600_000,
        )
        for i in range(12)
    ]
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "packets-0.tfrecord", "wb") as f:
        for record in records + records[:2]:  # two exact duplicates
            write_record(f, record)
    try:
        started = stack.up(state, only=["prism"])
        endpoint = started["prism"].piece.endpoints["job_endpoint"]
        monkeypatch.setenv("QIS_STACK_DIR", str(state))
        assert f"--job_endpoint={endpoint}" in profile_args("local-prism", streaming=False)
        out = tmp_path / "out"
        args = ["backfill", "--input", str(tmp_path / "in" / "*.tfrecord"), "--output", str(out)]
        assert main([*args, "--profile", "local-prism"]) == 0
    finally:
        stopped = stack.down(state)
    assert len(stopped["prism"]) == 1 and gone(stopped["prism"][0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runner"] == "PortableRunner" and summary["duplicates"] == 2
    got = by_key(read_json_lines(str(out), "synthesis"))
    assert_same_syntheses(got, expected_records(records, 3_600_000))


@pytest.mark.slow
def test_session_fixtures_give_live_engines(
    kafka_bootstrap, pubsub_emulator_host, postgres_url, flink_rest_url, prism_path
):
    assert re.fullmatch(r"127\.0\.0\.1:\d+", kafka_bootstrap)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", pubsub_emulator_host)
    kafka_round_trip(kafka_bootstrap)
    pubsub_round_trip(pubsub_emulator_host)
    postgres_round_trip(postgres_url)
    assert flink_overview(flink_rest_url)["slots-total"] == 2
    assert isinstance(prism_path, Path) and os.access(prism_path, os.X_OK)
    version = subprocess.run([str(prism_path), "--help"], capture_output=True, text=True)
    assert "-job_port" in version.stderr + version.stdout
