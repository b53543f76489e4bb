"""A backfill killed with SIGKILL at any point never damages the previous run's outputs or
store; the next run clears the debris (or finishes publishing a committed run) and completes.

Each backfill here runs as ``qis-beam backfill`` in a subprocess on the FnApiRunner, and is
killed from outside: while its pipeline runs (as soon as Beam's ``beam-temp-*`` folder
exists), and at the named points of qis_beam.jobs/publish, where ``QIS_PAUSE_AT`` makes it
wait to be killed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import HOUR_MS, T0_MS, fnapi_options, make_record, node_key

from qis_beam.jobs import run_job
from qis_beam.pipelines.backfill import build_backfill
from qis_beam.settings import Settings
from qis_beam.store import open_store
from qis_beam.tfrecords import write_record
from qis_beam.transforms.outputs import read_json_lines
from qis_beam.validation import ValidationPolicy

TIMEOUT_S = 180


def write_inputs(directory, packets: int, shards: int, seed: int) -> str:
    directory.mkdir()
    for shard in range(shards):
        with open(directory / f"packets-{shard}.tfrecord", "wb") as f:
            for i in range(shard, packets, shards):
                t = T0_MS + (i * 7919 % 3) * HOUR_MS + i
                record = make_record(
                    node_key(i % 5),
                    packet_id=(seed * 1_000_000 + i).to_bytes(16, "big"),
                    event_time_ms=t,
                    emit_time_ms=t,
                    outcome_type=1 + i % 4,
                    outcome_delta=((i * seed) % 17) / 100,
                )
                write_record(f, record)
    return str(directory / "*.tfrecord")


def expected_synthesis(pattern: str, output: str) -> set:
    settings = Settings(validation=ValidationPolicy(now_ms=T0_MS + 48 * HOUR_MS))
    run_job(lambda p: build_backfill(p, pattern, output, settings), output, fnapi_options())
    return synthesis_of(output)


def synthesis_of(output: str) -> set:
    return {
        (r["address"], r["window_start_ms"], r["n_packets"], round(r["total_weight"], 9))
        for r in read_json_lines(output, "synthesis")
    }


def files_of(output) -> dict[str, str]:
    """Every file under the output folder (store included) -> sha256, debris included."""
    found = {}
    for root, _, names in os.walk(output):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, output)] = hashlib.sha256(f.read()).hexdigest()
    return found


def debris(output) -> list[str]:
    return [n for n in os.listdir(output) if n.startswith(("_run-", "beam-temp-"))]


def backfill_argv(pattern: str, output: str) -> list[str]:
    return [
        *[sys.executable, "-m", "qis_beam.cli", "backfill", "--input", pattern],
        *["--output", output, "--runner", "FnApiRunner"],
    ]


def run_and_kill(pattern: str, output: str, tmp_path, point: str) -> None:
    """Start a backfill and SIGKILL it at ``point`` ("in-pipeline" or a pause point)."""
    marker = tmp_path / f"paused-{point}"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, QIS_PAUSE_AT=point, QIS_PAUSE_AT_FILE=str(marker))
    proc = subprocess.Popen(
        backfill_argv(pattern, output),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"ended before {point}: {proc.stderr.read()[-2000:]}"
            if point == "in-pipeline":
                runs = [n for n in os.listdir(output) if n.startswith("_run-")]
                if any(
                    n.startswith("beam-temp-")
                    for run in runs
                    for n in os.listdir(os.path.join(output, run))
                ):
                    break
            elif marker.exists():
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"backfill never reached {point}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def store_rows(output: str) -> dict:
    with open_store(os.path.join(output, "intelligence.db")) as store:
        return {a: store.latest(a) for a in store.addresses()}


@pytest.mark.slow
def test_killed_backfills_never_damage_previous_outputs_and_store(tmp_path):
    a = write_inputs(tmp_path / "a", 600, 2, seed=1)
    b = write_inputs(tmp_path / "b", 900, 3, seed=2)
    c = write_inputs(tmp_path / "c", 500, 1, seed=3)
    expected = {
        name: expected_synthesis(pattern, str(tmp_path / f"expected-{name}"))
        for name, pattern in (("a", a), ("b", b), ("c", c))
    }
    assert len({frozenset(v) for v in expected.values()}) == 3

    output = str(tmp_path / "out")
    expected_synthesis(a, output)  # the previous run
    before = files_of(output)
    rows_before = store_rows(output)

    # Killed before its commit point, a run leaves everything as it was (apart from its own
    # run folder, which the next run removes).
    for point in ("in-pipeline", "staged", "pipeline-done", "store-ready"):
        run_and_kill(b, output, tmp_path, point)
        after = {k: v for k, v in files_of(output).items() if not k.startswith("_run-")}
        assert after == before, point
        assert synthesis_of(output) == expected["a"]
        assert store_rows(output) == rows_before

    # Killed after its commit point, a run is complete: the next run publishes it first.
    run_and_kill(b, output, tmp_path, "committed")
    run_and_kill(c, output, tmp_path, "staged")  # recovery, then killed: b is published
    assert synthesis_of(output) == expected["b"]
    assert [n[:5] for n in debris(output)] == ["_run-"]  # c's own, uncommitted

    # Killed half-way through publishing (one file renamed): finished by the next run.
    run_and_kill(c, output, tmp_path, "mid-publish")
    subprocess.run(backfill_argv(c, output), check=True, capture_output=True, timeout=TIMEOUT_S)
    assert synthesis_of(output) == expected["c"]
    assert debris(output) == []
    rows = store_rows(output)
    assert {r["address"] for r in rows.values()} >= {a for a, *_ in expected["c"]}
    assert all(rows[addr]["n_packets"] for addr in rows)
