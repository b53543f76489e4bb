"""A Flink batch backfill's parallelism is sized from its input (runners/sizing.py).

The limit it guards (a TaskManager holding a subtask's whole stage output) was measured on the
local stack, not here: a test cannot spend the minutes and gigabytes it takes. These tests
check the rule and that ``backfill`` applies it before the job is built.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions

from qis_beam.cli import main
from qis_beam.positions import ASSUMED_RECORD_BYTES
from qis_beam.runners import sizing
from qis_beam.runners.sizing import (
    CALIBRATION_SLOT_HEAP,
    RECORDS_PER_SUBTASK,
    flink_backfill_parallelism,
    slot_task_heap,
)

FLINK = ["--runner=FlinkRunner", "--flink_master=127.0.0.1:1"]


def bytes_for(records: int) -> int:
    return records * ASSUMED_RECORD_BYTES


def parallelism(options: PipelineOptions) -> int:
    return options.view_as(FlinkRunnerOptions).parallelism


def test_a_large_input_raises_the_profiles_parallelism():
    options = PipelineOptions([*FLINK, "--parallelism=2"])
    note = flink_backfill_parallelism(options, bytes_for(5 * RECORDS_PER_SUBTASK + 1), False)
    assert parallelism(options) == 6
    assert note is not None and "--parallelism=6" in note


def test_an_unset_parallelism_is_raised_too():
    options = PipelineOptions(FLINK)
    flink_backfill_parallelism(options, bytes_for(3 * RECORDS_PER_SUBTASK), False)
    assert parallelism(options) == 3


def test_an_explicit_parallelism_stays_and_gets_a_warning():
    options = PipelineOptions([*FLINK, "--parallelism=1"])
    note = flink_backfill_parallelism(options, bytes_for(2 * RECORDS_PER_SUBTASK + 1), True)
    assert parallelism(options) == 1
    assert note is not None and note.startswith("warning:") and "--parallelism=3" in note


@pytest.mark.parametrize(
    "args, records, explicit",
    [
        ([*FLINK, "--parallelism=2"], 2 * RECORDS_PER_SUBTASK, False),  # enough already
        ([*FLINK, "--parallelism=2"], 2 * RECORDS_PER_SUBTASK, True),
        (["--runner=FnApiRunner", "--parallelism=2"], 10 * RECORDS_PER_SUBTASK, False),
        (["--runner=DataflowRunner", "--parallelism=2"], 10 * RECORDS_PER_SUBTASK, False),
        ([*FLINK, "--streaming", "--parallelism=2"], 10 * RECORDS_PER_SUBTASK, False),
    ],
)
def test_left_alone(args, records, explicit):
    """Enough parallelism, other runners and streaming jobs: no change, nothing to say."""
    options = PipelineOptions(args)
    assert flink_backfill_parallelism(options, bytes_for(records), explicit) is None
    assert parallelism(options) == 2


@pytest.mark.parametrize(
    "given, expected, warns",
    [([], 4, False), (["--parallelism=2"], 2, True), (["--parallelism", "5"], 5, False)],
)
def test_backfill_sizes_flink_before_the_job(given, expected, warns, tmp_path, monkeypatch, capsys):
    """The CLI's wiring: the user's own ``--parallelism`` counts as explicit (either form),
    the profile's does not; the job gets the sized options. Nothing is submitted."""
    log = tmp_path / "packets-0.tfrecord"
    log.write_bytes(b"\0" * 4000)  # ~20 records by the estimate
    monkeypatch.setattr(sizing, "RECORDS_PER_SUBTASK", 5)
    submitted = []

    def run_job(build, output, options, store_url=None):
        submitted.append(options)
        return {"dry_run": True, "runner": "FlinkRunner", "job_type": "batch", "transforms": 0}

    monkeypatch.setattr("qis_beam.jobs.run_job", run_job)
    argv = ["backfill", "--input", str(log), "--output", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--profile", "flink", *given]) == 0
    assert parallelism(submitted[0]) == expected
    err = capsys.readouterr().err
    assert ("warning:" in err) == warns
    assert ("--parallelism=4" in err) == (expected == 4 or warns)


@pytest.fixture
def flink_rest():
    """A stand-in for Flink's REST API on loopback: serves ``body`` at ``/taskmanagers``."""
    served = {"body": b"{}"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = served["body"] if self.path == "/taskmanagers" else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def taskmanager(task_heap: int, slots: int) -> dict:
    return {"slotsNumber": slots, "memoryConfiguration": {"taskHeap": task_heap}}


def test_the_bound_follows_the_clusters_smallest_task_heap_per_slot(flink_rest):
    served, master = flink_rest
    # Slots of twice and four times the local stack's task heap: the smaller one counts.
    served["body"] = json.dumps(
        {
            "taskmanagers": [
                taskmanager(8 * CALIBRATION_SLOT_HEAP, 2),
                taskmanager(8 * CALIBRATION_SLOT_HEAP, 4),
            ]
        }
    ).encode()
    assert slot_task_heap(master) == 2 * CALIBRATION_SLOT_HEAP
    options = PipelineOptions(["--runner=FlinkRunner", f"--flink_master={master}"])
    note = flink_backfill_parallelism(options, bytes_for(5 * RECORDS_PER_SUBTASK), False)
    assert parallelism(options) == 3  # 40M records at 16M a subtask, not 5 at 8M
    assert note is not None and f"{2 * RECORDS_PER_SUBTASK:,} a subtask" in note


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"taskmanagers": [{"slotsNumber": 2}]}', b'{"taskmanagers": []}'],
)
def test_an_unreadable_cluster_keeps_the_local_bound(flink_rest, body):
    served, master = flink_rest
    served["body"] = body
    assert slot_task_heap(master) is None
    options = PipelineOptions(["--runner=FlinkRunner", f"--flink_master={master}"])
    flink_backfill_parallelism(options, bytes_for(5 * RECORDS_PER_SUBTASK), False)
    assert parallelism(options) == 5


@pytest.mark.parametrize("master", [None, "[auto]", "[local]", "127.0.0.1:1"])
def test_no_rest_api_to_ask(master):
    assert slot_task_heap(master) is None
