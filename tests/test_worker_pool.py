"""The stack's SDK worker pool (``python -m qis_beam.stack.worker_pool``).

Beam's PortableRunner with its embedded job service (the FnApiRunner) asks an EXTERNAL
environment for workers exactly as Flink does, so a pipeline run through the pool proves that
it starts a working SDK harness per request, in a process of its own; a StopWorker call ends
that process, and
leaves nothing behind when the pool itself is stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import apache_beam as beam
import grpc
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc
from apache_beam.testing.util import assert_that, equal_to

from qis_beam.stack.ports import free_port, port_open
from qis_beam.stack.procs import group_members, start_ticks


@pytest.fixture
def pool(tmp_path):
    """(address, Popen, log path) of a pool in its own process group, stopped by its PID."""
    port = free_port()
    log = tmp_path / "pool.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qis_beam.stack.worker_pool", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not port_open(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the pool did not listen within 60 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}", process, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_pipeline_runs_in_workers_forked_by_the_pool(pool):
    address, process, log = pool
    options = PipelineOptions(
        [
            "--runner=PortableRunner",
            "--job_endpoint=embed",
            "--environment_type=EXTERNAL",
            f"--environment_config={address}",
        ]
    )
    here = os.getpid()
    with beam.Pipeline(options=options) as p:
        numbers = p | beam.Create(range(10))
        sums = numbers | beam.Map(lambda x: (x % 2, x)) | beam.CombinePerKey(sum)
        assert_that(sums, equal_to([(0, 20), (1, 25)]), label="Sums")
        pids = numbers | beam.Map(lambda _: os.getpid()) | beam.Distinct()
        assert_that(
            pids,
            lambda found: [pid for pid in found if pid in (here, process.pid)] == [],
            label="WorkerProcesses",
        )
    started = re.findall(r"started worker (\S+) \(pid (\d+)\)", log.read_text())
    assert started, log.read_text()

    # StopWorker (Flink's call when a stage's environment is released) ends the worker.
    worker_id, pid = started[0]
    stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(grpc.insecure_channel(address))
    response = stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id=worker_id))
    assert response.error == ""
    assert start_ticks(int(pid)) is None

    # SIGTERM stops the pool, its fork server and any worker: the group is empty.
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    deadline = time.monotonic() + 15
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(process.pid) == []
