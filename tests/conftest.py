"""Shared fixtures: deterministic node keys, packet builders, named test runners."""

from __future__ import annotations

import shutil

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from qis_beam.address import semantic_address
from qis_beam.emitter import build_packet, seal
from qis_beam.signing import NodeKey

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR_MS = 3_600_000


def node_key(i: int) -> NodeKey:
    return NodeKey.from_seed(i.to_bytes(32, "big"))


ADDRESS = semantic_address("llm-finetune/v1", {"task": "causal-lm", "params": 1e9})


def make_packet(key: NodeKey | None = None, **fields):
    key = key or node_key(1)
    values = dict(
        key=key,
        address=ADDRESS,
        template_id="llm-finetune/v1",
        approach_id="lr_schedule=cosine",
        outcome_type=1,
        outcome_delta=0.04,
        confidence=0.8,
        sample_count=100,
        event_time_ms=T0_MS,
        emit_time_ms=T0_MS + 1000,
        packet_id=bytes(range(16)),
    )
    values.update(fields)
    return build_packet(**values)


def make_record(key: NodeKey | None = None, **fields) -> bytes:
    key = key or node_key(1)
    return seal(key, make_packet(key, **fields))


def fnapi_options(**extra) -> PipelineOptions:
    """Bounded pipelines in tests always name their runner (a bare DirectRunner tries Prism)."""
    return PipelineOptions([], runner="FnApiRunner", **extra)


@pytest.fixture
def unrun_pipeline():
    """Makes pipelines that are built for their protos and never run: Beam gives each one a
    temporary folder that only ``run()`` removes, so this removes it when the test ends."""
    made: list[beam.Pipeline] = []

    def make(options: PipelineOptions) -> beam.Pipeline:
        made.append(beam.Pipeline(options=options))
        return made[-1]

    yield make
    for pipeline in made:
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)


@pytest.fixture
def key():
    return node_key(1)


@pytest.fixture(scope="session")
def serving_postgres():
    """A private PostgreSQL server that serving tests may stop and restart (store down ->
    UNAVAILABLE -> recovery); see tests/pg_local.py. Stopped by its PID at the end."""
    from pg_local import LocalPostgres

    server = LocalPostgres().start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_server(request):
    """URL of a PostgreSQL server: the stack's ``postgres_url`` when provided, else the
    private ``serving_postgres``."""
    try:
        return request.getfixturevalue("postgres_url")
    except pytest.FixtureLookupError:
        return request.getfixturevalue("serving_postgres").url


# --- engines of `qis-beam stack` (qis_beam/stack), one per session, started on first use -----


def _stack_piece(tmp_path_factory, name: str):
    """Start only ``name`` in a fresh state dir on free ports; stop it by PID at session end.

    Never skips: a piece that cannot start fails the test with the tail of its log.
    """
    from qis_beam import stack

    state_dir = tmp_path_factory.mktemp(f"stack-{name}")
    try:
        # Tied: if pytest is killed before teardown, the engines stop with it.
        started = stack.up(state_dir, only=[name], tie_to_caller=True)
    except stack.PieceFailed as error:
        pytest.fail(f"{error}\n{stack.log_tail(error.log)}", pytrace=False)
    except (stack.FetchError, stack.DigestMismatch) as error:
        pytest.fail(f"qis-beam stack: {error}", pytrace=False)
    try:
        yield state_dir, started[name].piece
    finally:
        stack.down(state_dir, purge=True)


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory):
    """(state dir, record) of a single-node KRaft broker; see ``kafka_bootstrap``."""
    yield from _stack_piece(tmp_path_factory, "kafka")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_stack) -> str:
    """``"127.0.0.1:PORT"`` of a running Kafka broker (topics auto-create)."""
    return kafka_stack[1].endpoints["bootstrap"]


@pytest.fixture(scope="session")
def pubsub_stack(tmp_path_factory):
    yield from _stack_piece(tmp_path_factory, "pubsub")


@pytest.fixture(scope="session")
def pubsub_emulator_host(pubsub_stack) -> str:
    """``"127.0.0.1:PORT"`` of the Pub/Sub emulator; set PUBSUB_EMULATOR_HOST yourself."""
    return pubsub_stack[1].endpoints["host"]


@pytest.fixture(scope="session")
def postgres_stack(tmp_path_factory):
    yield from _stack_piece(tmp_path_factory, "postgres")


@pytest.fixture(scope="session")
def postgres_url(postgres_stack) -> str:
    """``postgresql://qis@127.0.0.1:PORT/qis`` (the ``qis`` role may CREATE DATABASE)."""
    return postgres_stack[1].endpoints["url"]


@pytest.fixture(scope="session")
def flink_stack(tmp_path_factory):
    """(state dir, record) of a Flink session cluster: JobManager + 1 TaskManager, 2 slots.

    ``qis_beam.stack.status(state_dir)["flink"].procs`` has the PIDs (kill a TaskManager for
    a recovery test) and ``qis_beam.stack.add_taskmanager(state_dir)`` starts a new one.
    """
    yield from _stack_piece(tmp_path_factory, "flink")


@pytest.fixture(scope="session")
def flink_rest_url(flink_stack) -> str:
    """``http://127.0.0.1:PORT`` (Flink REST and web UI; ``--flink_master`` is host:port)."""
    return flink_stack[1].endpoints["rest"]


@pytest.fixture(scope="session")
def prism_path():
    """pathlib.Path of the Prism v2.77.0 binary (cached; built with `go install` if missing)."""
    from qis_beam import stack

    try:
        return stack.prism_path()
    except (stack.FetchError, stack.DigestMismatch) as error:
        pytest.fail(f"qis-beam stack: {error}", pytrace=False)


@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    """Path of Beam's Flink job-server jar (assembled by ``qis-beam stack fetch``, cached)."""
    from qis_beam import stack
    from qis_beam.stack.jobserver import fetch_job_server
    from qis_beam.stack.maven import MavenError

    try:
        return str(fetch_job_server().path)
    except (stack.FetchError, stack.DigestMismatch, MavenError) as error:
        pytest.fail(f"qis-beam stack: {error}", pytrace=False)
