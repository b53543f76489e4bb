"""qis-beam on Flink 1.19: Beam's Flink job server (``--profile local-flink``) against the
stack's Flink session cluster (the ``flink_stack`` fixture); the backfill's Python runs in the
stack's SDK worker pool, the streaming jobs' in the LOOPBACK harness.

* A backfill on Flink (parallelism 2) equals a FnApiRunner backfill of the same files:
  synthesis, dead letters (per record), summary tallies.
* ``qis-beam run --source kafka`` on Flink: the scenario of tests/kafka_helpers.py (shared with
  the Prism tests) -- live records -> Kafka -> run on Flink -> PostgreSQL -> ``qis-beam serve``
  -> client -- equals the backfill of the same packets.
* A checkpoint barrier inside the Kafka read's first bundle does not stall the job.
* Recovery: the TaskManager JVM is SIGKILLed while the Kafka job runs with checkpoints, a new
  one is started, publishing goes on, and the job restores from its checkpoint and ends with a
  store equal to the backfill of everything published.

Every process a test starts (launcher, job server, ``qis-beam serve``) is stopped by its PID
and any Flink job it left on the cluster is cancelled over REST. The TaskManager started by
the recovery test joins the session's cluster record, so the session's ``stack.down`` stops it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kafka_helpers
import pytest
from brute_force import assert_close, assert_same_syntheses, by_key

from qis_beam.cli import main
from qis_beam.runners.profiles import pool_args


def job_server_jar(request) -> str:
    """The job-server jar ``qis-beam stack fetch`` assembles (conftest fixture)."""
    return str(request.getfixturevalue("flink_job_server_jar"))


def flink_args(request, flink_stack) -> list[str]:
    """Beam arguments of a run on the stack's cluster: the ``local-flink`` profile with the
    cluster and the jar named explicitly, parallelism 2 (the TaskManager's 2 slots)."""
    return [
        "--profile",
        "local-flink",
        f"--flink_master={flink_stack[1].endpoints['flink_master']}",
        f"--flink_job_server_jar={job_server_jar(request)}",
        "--parallelism=2",
    ]


class FlinkRest:
    """The cluster's REST API: the jobs a test submitted, their restarts and checkpoints."""

    TERMINAL = ("FINISHED", "CANCELED", "FAILED")

    def __init__(self, url: str):
        self.url = url
        self.before = self.job_ids()  # jobs that were there before the test

    def _get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.load(response)

    def job_ids(self) -> set[str]:
        return {j["jid"] for j in self._get("/jobs/overview")["jobs"]}

    def new_jobs(self) -> list[dict]:
        return [j for j in self._get("/jobs/overview")["jobs"] if j["jid"] not in self.before]

    def wait_new_job(self, process: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            jobs = self.new_jobs()
            if jobs:
                return jobs[0]["jid"]
            time.sleep(1)
        raise AssertionError("the job never reached the cluster")

    def job(self, jid: str) -> dict:
        return self._get(f"/jobs/{jid}")

    def restarts(self, jid: str) -> int:
        metrics = self._get(f"/jobs/{jid}/metrics?get=numRestarts")
        return int(float(metrics[0]["value"])) if metrics else 0

    def checkpoints(self, jid: str) -> dict:
        return self._get(f"/jobs/{jid}/checkpoints")["counts"]

    def latest_checkpoint(self, jid: str) -> dict | None:
        """The latest completed checkpoint (``trigger_timestamp`` in ms), None before one."""
        return self._get(f"/jobs/{jid}/checkpoints")["latest"]["completed"]

    def running_again(self, jid: str) -> bool:
        """Restarted at least once and every task deployed and running (or done)."""
        job = self.job(jid)
        tasks_up = all(v["status"] in ("RUNNING", "FINISHED") for v in job["vertices"])
        return job["state"] == "RUNNING" and tasks_up and self.restarts(jid) >= 1

    def cancel_new(self) -> None:
        """Cancel every job submitted since this object was made that has not ended."""
        for job in self.new_jobs():
            if job["state"] not in self.TERMINAL:
                request = urllib.request.Request(
                    f"{self.url}/jobs/{job['jid']}?mode=cancel", method="PATCH"
                )
                urllib.request.urlopen(request, timeout=10).close()


def run_cli(args: list[str], log_path: Path, timeout: float) -> tuple[int, str]:
    """``qis-beam ARGS`` in its own session, stopped by its PID (with the job server it
    started) whatever happens."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "qis_beam.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        process.wait(timeout=timeout)
    finally:
        kafka_helpers.stop(process)
    return process.returncode, log_path.read_text()


def matches(got: dict, want: dict) -> bool:
    try:
        assert_close(got, want)
    except AssertionError:
        return False
    return True


def without(record: dict, *fields: str) -> dict:
    return {k: v for k, v in record.items() if k not in fields}


# --- the CLI: a bounded Kafka run on Flink ends (fast) --------------------------------------


def _run_options(monkeypatch, tmp_path, extra: list[str]) -> dict:
    """The pipeline options ``qis-beam run`` would submit (the job itself is not run)."""
    import qis_beam.jobs

    seen = {}

    def capture(build, options, wait=False, on_submitted=None):
        seen.update(options.get_all_options(retain_unknown_options=True))
        return {"dry_run": False, "cancelled": False, "state": "DONE", "runner": "x"}

    monkeypatch.setattr(qis_beam.jobs, "run_streaming", capture)
    args = ["run", "--source", "kafka", "--input-topic", "t", "--bootstrap-servers", "h:1"]
    assert main([*args, "--output", str(tmp_path), *extra]) == 0
    return seen


@pytest.mark.parametrize(
    "extra",
    [
        ["--runner", "FlinkRunner"],
        ["--runner=FlinkRunner", "--shutdown_sources_after_idle_ms=99"],
        ["--profile", "flink"],
    ],
)
def test_a_bounded_kafka_run_on_flink_is_refused(extra, capsys, tmp_path):
    """Flink's idle-source shutdown would end the stream before the reader read its backlog
    and drop the rest: one clear line and exit 2 instead of a silent loss."""
    args = ["run", "--source", "kafka", "--input-topic", "t", "--bootstrap-servers", "h:1"]
    bounded = ["--kafka-stop-when-idle", "15s"]
    assert main([*args, "--output", str(tmp_path / "o"), *bounded, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "qis-beam run: --kafka-stop-when-idle cannot end a job on the FlinkRunner"
    )
    assert not (tmp_path / "o").exists()


def test_an_unbounded_kafka_run_on_flink_gets_no_idle_shutdown(monkeypatch, tmp_path):
    options = _run_options(monkeypatch, tmp_path, ["--runner", "FlinkRunner"])
    assert "shutdown_sources_after_idle_ms" not in options


# --- 1. a backfill on Flink equals the FnApiRunner's --------------------------------------


@pytest.mark.slow
@pytest.mark.flink
def test_backfill_on_flink_equals_the_fnapi_runner_backfill(request, flink_stack, tmp_path):
    from qis_beam.sim import SwarmConfig, simulate
    from qis_beam.transforms.outputs import read_json_lines

    report = simulate(
        str(tmp_path / "swarm"),
        SwarmConfig(
            packets=3000,
            addresses=6,
            nodes=40,
            duplicate_fraction=0.05,  # exact and conflicting copies
            malformed_fraction=0.02,  # every malformed kind
            shards=2,
            seed=5,
        ),
    )
    assert report.duplicates and report.conflicting and report.malformed_by_reason
    common = [
        "backfill",
        "--input",
        str(tmp_path / "swarm" / "packets-*.tfrecord"),
        "--node-registry",
        str(tmp_path / "swarm" / "nodes.txt"),
        "--quiet",
    ]
    fnapi, flink = tmp_path / "fnapi", tmp_path / "flink"
    assert main([*common, "--output", str(fnapi), "--runner", "FnApiRunner"]) == 0
    rest = FlinkRest(flink_stack[1].endpoints["rest"])
    # Python runs in the stack's SDK worker pool, two worker processes, as `local-flink` does
    # for batch (tests name the cluster explicitly; the profile reads the user's stack).
    pool = pool_args(flink_stack[1].endpoints["sdk_worker_pool"])
    try:
        code, log = run_cli(
            [*common, "--output", str(flink), *flink_args(request, flink_stack), *pool],
            tmp_path / "flink.log",
            timeout=600,
        )
    finally:
        rest.cancel_new()
    assert code == 0, log[-3000:]
    assert [j["state"] for j in rest.new_jobs()] == ["FINISHED"]

    # Synthesis: the same (address, window) rows with the same statistics.
    assert_same_syntheses(
        by_key(read_json_lines(str(flink), "synthesis")),
        by_key(read_json_lines(str(fnapi), "synthesis")),
    )

    # Dead letters: the same records with the same reasons (and details, except the clock
    # each run judged future event times by).
    def dead(directory: Path) -> collections.Counter:
        return collections.Counter(
            (
                d["reason"],
                d.get("packet_id"),
                d["record_b64"],
                d["source"],
                None if d["reason"] == "future_event_time" else d["detail"],
            )
            for d in read_json_lines(str(directory), "dead_letters")
        )

    fnapi_dead = dead(fnapi)
    assert dead(flink) == fnapi_dead
    assert {"conflicting_duplicate", "future_event_time", "undecodable"} <= {
        reason for reason, *_ in fnapi_dead
    }

    # Summary tallies: equal, and they balance.
    got = json.loads((flink / "summary.json").read_text())
    want = json.loads((fnapi / "summary.json").read_text())
    tallies = ("records_in", "valid", "duplicates", "dead_letters", "too_late", "balanced")
    for name in (*tallies, "addresses", "windows", "synthesis_records"):
        assert got[name] == want[name], name
    assert got["balanced"] is True and got["runner"] == "FlinkRunner"
    assert got["records_in"] == report.records


# --- 2. live records -> Kafka -> run on Flink -> PostgreSQL -> serve -> client -------------


@pytest.fixture(scope="module")
def flink_kafka_run(request, flink_stack, kafka_bootstrap, postgres_url, tmp_path_factory):
    """The two-phase Kafka scenario of tests/kafka_helpers.py, run on Flink."""
    from pg_local import fresh_database

    scenario = kafka_helpers.prepare(tmp_path_factory.mktemp("flink-kafka"), kafka_bootstrap)
    rest = FlinkRest(flink_stack[1].endpoints["rest"])
    expected = Expected(kafka_helpers.backfill(scenario))
    store_url = fresh_database(postgres_url)
    stream = scenario.work / "stream"
    ends: dict = {}
    partitions = kafka_helpers.PARTITIONS

    def converged() -> bool:
        """The store and files equal the backfill, and a checkpoint committed the offsets."""
        if expected.store_differences(store_url) or expected.file_differences(stream):
            return False
        ends.update(kafka_helpers.end_offsets(kafka_bootstrap, scenario.topic, partitions))
        group = kafka_helpers.committed(kafka_bootstrap, scenario.topic, scenario.group, partitions)
        return group == ends

    run = kafka_helpers.two_phase_run(
        scenario,
        store_url,
        flink_args(request, flink_stack),
        # Flink commits offsets only when a checkpoint completes: phase 2 follows once the
        # store has phase 1.
        gate="stored",
        # Unbounded, as in production: a bounded run cannot end on Flink without losing
        # records (qis_beam/cli/pipelines.py); the job is cancelled once it converged.
        stop_when_idle=None,
        until=converged,
        phase1_timeout=400,  # job server start + submission + reading phase 1
        finish_timeout=400,
        cleanup=rest.cancel_new,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        j["state"] not in FlinkRest.TERMINAL for j in rest.new_jobs()
    ):
        time.sleep(0.5)
    run["flink_jobs"] = rest.new_jobs()
    print(f"\nflink kafka run: {run['timings']}")
    return run


@pytest.mark.slow
@pytest.mark.flink
def test_kafka_run_on_flink_equals_a_backfill_of_the_same_packets(flink_kafka_run):
    kafka_helpers.check_stream_equals_backfill(flink_kafka_run)
    # One job, still running when the test cancelled it after convergence.
    assert [j["state"] for j in flink_kafka_run["flink_jobs"]] == ["CANCELED"]
    # The group's offsets were committed up to the end of the topic.
    assert flink_kafka_run["committed"] == flink_kafka_run["end_offsets"]


@pytest.mark.slow
@pytest.mark.flink
def test_kafka_run_on_flink_all_time_snapshots_equal_the_backfill(flink_kafka_run):
    kafka_helpers.check_all_time_snapshots(flink_kafka_run)


@pytest.mark.slow
@pytest.mark.flink
def test_the_flink_stream_served_over_grpc_answers_what_the_backfill_computed(flink_kafka_run):
    """The issue's end to end: live records -> Kafka -> ``qis-beam run`` on Flink ->
    PostgreSQL -> ``qis-beam serve`` -> the node's client."""
    assert "submitted the streaming job" in flink_kafka_run["log"], flink_kafka_run["log"][-3000:]
    kafka_helpers.check_served_answers(flink_kafka_run)


# --- 3. a killed TaskManager: restore from the checkpoint -----------------------------------


def _live_taskmanagers(state_dir):
    from qis_beam import stack
    from qis_beam.stack.procs import alive

    piece = stack.status(state_dir)["flink"]
    return [p for p in piece.procs if p.role.startswith("taskmanager") and alive(p)]


def _sigkill(proc, timeout: float = 30) -> None:
    """SIGKILL the TaskManager JVM itself (its recorded PID), then wait until it is gone."""
    from qis_beam.stack.procs import alive

    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert b"java" in cmdline and b"TaskManagerRunner" in cmdline, cmdline[:200]
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(proc) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(proc)


def _wait(condition, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the launcher ended while waiting for {what}"
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


class Expected:
    """The backfill of everything published, and how a run's outputs compare with it."""

    def __init__(self, batch: Path):
        from qis_beam.transforms.outputs import read_json_lines

        records = list(read_json_lines(str(batch), "synthesis"))
        self.all_time = {r["address"]: r for r in records if r["window_start_ms"] is None}
        self.windows = collections.defaultdict(dict)
        for r in records:
            if r["window_start_ms"] is not None:
                self.windows[r["address"]][r["window_start_ms"]] = r
        self.dead = {
            (d["reason"], d["record_b64"]) for d in read_json_lines(str(batch), "dead_letters")
        }

    def store_differences(self, store_url: str) -> list[str]:
        """Where the store differs from the backfill (all-time rows and window rows)."""
        from qis_beam.store import open_store

        def same(got, want) -> bool:
            return got is not None and matches(
                without(got, "pane", "provenance"), without(want, "pane", "provenance")
            )

        differences = []
        with open_store(store_url, create=True) as store:
            if sorted(store.addresses()) != sorted(self.all_time):
                return [f"addresses {sorted(store.addresses())}"]
            for address, want in self.all_time.items():
                if not same(store.latest(address), want):
                    differences.append(f"{address} all-time")
                stored = {r["window_start_ms"]: r for r in store.windows(address)}
                if stored.keys() != self.windows[address].keys():
                    differences.append(f"{address} windows {sorted(stored)}")
                    continue
                for start, want_window in self.windows[address].items():
                    if not same(stored[start], want_window):
                        differences.append(f"{address}@{start}")
        return differences

    def file_differences(self, stream: Path) -> list[str]:
        """Files are at-least-once: every window and every address's all-time synthesis
        needs a pane equal to the backfill's, and the dead letters must be the backfill's
        (repeats allowed). (The files roll every --flush-every: they may lag the store.)"""
        from qis_beam.transforms.outputs import read_json_lines

        panes = collections.defaultdict(list)
        for r in read_json_lines(str(stream), "synthesis"):
            panes[(r["address"], r["window_start_ms"])].append(without(r, "pane"))
        differences = [
            f"{address}@{start} file"
            for address, by_start in self.windows.items()
            for start, want in by_start.items()
            if not any(matches(p, without(want, "pane")) for p in panes[(address, start)])
        ]
        differences += [
            f"{address} all-time file"
            for address, want in self.all_time.items()
            if not any(matches(p, without(want, "pane")) for p in panes[(address, None)])
        ]
        dead = {
            (d["reason"], d["record_b64"]) for d in read_json_lines(str(stream), "dead_letters")
        }
        if dead != self.dead:
            differences.append(f"dead letters: {len(dead)} kinds, backfill {len(self.dead)}")
        return differences


@pytest.mark.slow
@pytest.mark.flink
def test_the_kafka_job_reads_when_a_checkpoint_lands_in_its_first_bundle(
    request, flink_stack, kafka_bootstrap, postgres_url, tmp_path
):
    """Checkpoints every 300 ms put a barrier inside the read's first bundle (Impulse ->
    ListPartitions). Finished inside the snapshot, that bundle's one output stayed in operator
    state and the read never started; the profile ends bundles before barriers instead."""
    from pg_local import fresh_database

    rest = FlinkRest(flink_stack[1].endpoints["rest"])
    scenario = kafka_helpers.prepare(tmp_path, kafka_bootstrap, packets=300, seed=5)
    kafka_helpers.publish(kafka_bootstrap, scenario.topic, scenario.phase1)
    ends = kafka_helpers.end_offsets(kafka_bootstrap, scenario.topic, kafka_helpers.PARTITIONS)
    runner_args = [*flink_args(request, flink_stack), "--checkpointing_interval=300"]
    command = kafka_helpers.run_command(
        scenario, fresh_database(postgres_url), runner_args, stop_when_idle=None
    )
    process = kafka_helpers.start_run(command, tmp_path / "run.log")
    try:
        rest.wait_new_job(process, timeout=300)
        # Without the option: 3 of 3 such starts never committed anything in 60 s.
        assert kafka_helpers.wait_committed(scenario, ends, process, timeout=90), (
            f"the first records were never committed; see {tmp_path / 'run.log'}"
        )
    finally:
        rest.cancel_new()
        kafka_helpers.stop(process)


@pytest.mark.slow
@pytest.mark.flink
def test_the_kafka_job_survives_a_killed_taskmanager(
    request, flink_stack, kafka_bootstrap, postgres_url, tmp_path
):
    """An unbounded ``qis-beam run`` on Flink (checkpoints every 10 s, fixed-delay restarts):
    SIGKILL the TaskManager, start a new one, keep publishing; the job restores from its
    checkpoint and the store reaches the backfill of everything published."""
    from pg_local import fresh_database

    from qis_beam import stack
    from qis_beam.transforms.outputs import read_json_lines

    state_dir, piece = flink_stack
    rest = FlinkRest(piece.endpoints["rest"])
    scenario = kafka_helpers.prepare(tmp_path, kafka_bootstrap, packets=1500, seed=11)
    # A before the job, B read but not yet checkpointed when the TaskManager dies, C while
    # the cluster has no TaskManager, D once the job runs again.
    third = len(scenario.phase2) // 3
    phase_a = scenario.phase1
    phase_b = scenario.phase2[:third]
    phase_c = scenario.phase2[third : 2 * third]
    phase_d = scenario.phase2[2 * third :]
    expected = Expected(kafka_helpers.backfill(scenario))  # all of A, B, C, D
    store_url = fresh_database(postgres_url)
    kafka_helpers.publish(kafka_bootstrap, scenario.topic, phase_a)
    a_ends = kafka_helpers.end_offsets(kafka_bootstrap, scenario.topic, kafka_helpers.PARTITIONS)
    # Unbounded, as in production: the job ends when the test cancels it.
    command = kafka_helpers.run_command(
        scenario, store_url, flink_args(request, flink_stack), stop_when_idle=None
    )
    process = kafka_helpers.start_run(command, tmp_path / "run.log")
    measured = {}
    started = time.monotonic()
    stream = scenario.work / "stream"
    try:
        jid = rest.wait_new_job(process, timeout=300)
        # Offsets are committed when a checkpoint completes: one did, after A was read.
        if not kafka_helpers.wait_committed(scenario, a_ends, process, timeout=400):
            kafka_helpers.dump_stacks(process)  # where the reader waits, into run.log
            jstacks = tmp_path / "taskmanager.jstack"  # and where the runner's operators wait
            for proc in stack.status(state_dir)["flink"].procs:
                if proc.role.startswith("taskmanager"):
                    with jstacks.open("a") as out, contextlib.suppress(OSError):
                        subprocess.run(["jstack", str(proc.pid)], stdout=out, check=False)
            pytest.fail(
                f"phase A was never committed; stacks in {tmp_path / 'run.log'} and {jstacks}"
            )
        measured["a_committed_s"] = round(time.monotonic() - started, 1)
        # B is read and reaches the store, with luck before the next checkpoint: what the
        # restored job reads again was then already written once.
        in_store = kafka_helpers.stored_packets(store_url)
        b_published_ms = time.time() * 1000
        kafka_helpers.publish(kafka_bootstrap, scenario.topic, phase_b)
        deadline = time.monotonic() + 8
        while kafka_helpers.stored_packets(store_url) <= in_store and time.monotonic() < deadline:
            time.sleep(0.3)
        measured["b_in_store_before_kill"] = kafka_helpers.stored_packets(store_url) > in_store
        latest = rest.latest_checkpoint(jid)
        measured["b_checkpointed_before_kill"] = bool(
            latest and latest["trigger_timestamp"] > b_published_ms
        )
        killed_pids = []
        for taskmanager in _live_taskmanagers(state_dir):  # the session's cluster has one
            _sigkill(taskmanager)
            killed_pids.append(taskmanager.pid)
        assert killed_pids
        killed = time.monotonic()
        kafka_helpers.publish(kafka_bootstrap, scenario.topic, phase_c)
        # start_taskmanager, recorded in the cluster's state: the session's `down` stops it.
        new_taskmanager = stack.add_taskmanager(state_dir, tie_to_caller=True)
        assert new_taskmanager.pid not in killed_pids
        measured["new_taskmanager_after_s"] = round(time.monotonic() - killed, 1)
        _wait(lambda: rest.running_again(jid), 400, "the job to run again", process)
        measured["running_again_after_s"] = round(time.monotonic() - killed, 1)
        kafka_helpers.publish(kafka_bootstrap, scenario.topic, phase_d)
        _wait(
            lambda: (
                not expected.store_differences(store_url) and not expected.file_differences(stream)
            ),
            400,
            "the store and files to reach the backfill",
            process,
        )
        measured["converged_after_kill_s"] = round(time.monotonic() - killed, 1)
        restarts, checkpoints = rest.restarts(jid), rest.checkpoints(jid)
        assert rest.job(jid)["state"] == "RUNNING"
    finally:
        rest.cancel_new()
        kafka_helpers.stop(process)
    assert restarts >= 1
    assert checkpoints["restored"] >= 1  # restored from a checkpoint, not started afresh
    # The store is exact: upserts only move a row to a later snapshot, so what the restored
    # job offered again changed nothing.
    assert expected.store_differences(store_url) == []
    assert expected.file_differences(stream) == []

    synthesis = list(read_json_lines(str(stream), "synthesis"))
    dead = list(read_json_lines(str(stream), "dead_letters"))
    panes = collections.Counter(
        (r["address"], r["window_start_ms"], r["pane"]["index"]) for r in synthesis
    )
    measured["panes_written_twice"] = sum(n - 1 for n in panes.values())
    measured["dead_letters_repeated"] = len(dead) - len(
        {(d["reason"], d["record_b64"]) for d in dead}
    )
    print(
        f"\nrecovery: {measured}; restarts={restarts}; checkpoints={checkpoints}; "
        f"synthesis records written={len(synthesis)}; dead letters written={len(dead)}"
    )
