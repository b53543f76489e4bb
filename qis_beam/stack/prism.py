"""Beam's Prism runner as a long-lived job service (``PortableRunner --job_endpoint``)."""

from __future__ import annotations

from pathlib import Path

from qis_beam.stack.fetch import fetch_prism
from qis_beam.stack.procs import spawn
from qis_beam.stack.state import Piece

NAME = "prism"
PORTS = ("job", "web")


def prism_path() -> Path:
    """The cached Prism binary (``go install``-ed at the pinned version if missing)."""
    return fetch_prism().path


def launch(state_dir: Path, ports: dict[str, int]) -> Piece:
    binary = prism_path()
    state = Path(state_dir) / NAME
    state.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        "job-service",
        [
            str(binary),
            f"--job_port={ports['job']}",
            f"--web_port={ports['web']}",
            "--log_kind=text",
        ],
        state / "prism.log",
        cwd=state,
    )
    return Piece(
        name=NAME,
        procs=[proc],
        endpoints={
            "job_endpoint": f"127.0.0.1:{ports['job']}",
            "ui": f"http://127.0.0.1:{ports['web']}",
        },
        log=proc.log,
        data={"binary": str(binary)},
    )


def healthy(piece: Piece) -> bool:
    """The Job API answers GetJobs."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    with grpc.insecure_channel(piece.endpoints["job_endpoint"]) as channel:
        stub = beam_job_api_pb2_grpc.JobServiceStub(channel)
        stub.GetJobs(beam_job_api_pb2.GetJobsRequest(), timeout=2)
    return True
