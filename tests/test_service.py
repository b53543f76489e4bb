"""The gRPC query service and its client, against SQLite and a real PostgreSQL server:
every RPC, every error status, health and reflection, deadlines, and a store that goes down
and comes back (TLS, tokens and floods: test_service_security.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pg_local import free_port, fresh_database
from served import PROBLEMS, Served, code_of, load
from serving_data import TEMPLATE, address_of, problem, records_for

from qis_beam.client import (
    IntelligenceClient,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from qis_beam.proto import query_pb2, query_pb2_grpc
from qis_beam.service.server import SERVICE_NAME, ServeConfig, start_server
from qis_beam.store import Store, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/intelligence.db"
    return fresh_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def served(store_url):
    s = Served(store_url)
    yield s
    s.close()


def test_get_synthesis_by_address_and_by_problem(served):
    with IntelligenceClient(served.target) as client:
        for i in range(PROBLEMS):
            address = address_of(i)
            expected = served.records[address][0]
            got = client.synthesis(address)
            assert got.to_record() == expected
            assert got.provenance.run_id == "backfill-test"
            assert got.provenance.snapshot_ms == expected["last_event_ms"]
            by_problem = client.synthesis(template_id=TEMPLATE, context=problem(i))
            assert by_problem == got
        # numbers are binned like the emitter's: params 1e9 and 2e9 share a decade
        assert client.synthesis(
            template_id=TEMPLATE, context={**problem(0), "params": 2e9}
        ).address == address_of(0)
        hidden = client.synthesis(address_of(99))
        assert hidden.suppressed and hidden.approaches == () and hidden.n_packets == 2
        assert hidden.to_record() == records_for(99, packets=2, min_nodes=50)[0]


def test_get_windows_and_range(served):
    address = address_of(1)
    expected = served.records[address][1:]
    with IntelligenceClient(served.target) as client:
        assert [w.to_record() for w in client.windows(address)] == expected
        second = expected[1]["window_start_ms"]
        got = client.windows(address, from_ms=second, to_ms=second + 1)
        assert [w.window_start_ms for w in got] == [second]
        assert len(client.windows(address, limit=1)) == 1
        assert client.windows(address, from_ms=0, to_ms=1) == []  # known address, no window


def test_recommend_ranks_and_cuts_to_k(served):
    with IntelligenceClient(served.target) as client:
        for i in range(PROBLEMS):
            ranked = served.records[address_of(i)][0]["approaches"]
            rec = client.recommend(TEMPLATE, problem(i), k=2)
            assert [a.approach_id for a in rec.approaches] == [a["approach_id"] for a in ranked[:2]]
            assert rec.best.approach_id == rec.recommended_approach == ranked[0]["approach_id"]
            assert rec.best.success_mean == ranked[0]["success_mean"]
            assert rec.best.mean_delta == ranked[0]["mean_delta"]
            assert rec.n_nodes == served.records[address_of(i)][0]["n_nodes"]
            assert len(client.recommend(TEMPLATE, problem(i), k=0).approaches) == len(ranked)


def test_bad_requests_name_the_field(served):
    stub = served.stub
    bad = [
        (stub.GetSynthesis, query_pb2.GetSynthesisRequest(), "target"),
        (stub.GetSynthesis, query_pb2.GetSynthesisRequest(address="xyz"), "address"),
        (
            stub.GetSynthesis,
            query_pb2.GetSynthesisRequest(problem=query_pb2.Problem(template_id="Bad Id")),
            "problem.template_id",
        ),
        (
            stub.GetSynthesis,
            query_pb2.GetSynthesisRequest(
                problem=query_pb2.Problem(template_id=TEMPLATE, context={"a=b": "1"})
            ),
            "problem.context",
        ),
        (stub.GetWindows, query_pb2.GetWindowsRequest(address="0" * 63), "address"),
        (
            stub.GetWindows,
            query_pb2.GetWindowsRequest(address="0" * 64, from_ms=5, to_ms=5),
            "to_ms",
        ),
        (stub.GetWindows, query_pb2.GetWindowsRequest(address="0" * 64, limit=10**6), "limit"),
        (stub.Recommend, query_pb2.RecommendRequest(context=problem(0)), "template_id"),
        (
            stub.Recommend,
            query_pb2.RecommendRequest(template_id=TEMPLATE, context={"k": "a|b"}),
            "context",
        ),
        (
            stub.Recommend,
            query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(0), k=5000),
            "k",
        ),
    ]
    for method, request, field in bad:
        code, details = code_of(method, request, timeout=5)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (field, details)
        assert details.startswith(f"{field}: "), (field, details)
    with IntelligenceClient(served.target) as client, pytest.raises(InvalidArgument):
        client.synthesis("not-hex")


def test_unknown_address_is_not_found(served):
    unknown = "0" * 64
    for method, request in (
        (served.stub.GetSynthesis, query_pb2.GetSynthesisRequest(address=unknown)),
        (served.stub.GetWindows, query_pb2.GetWindowsRequest(address=unknown)),
        (
            served.stub.Recommend,
            query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(12345)),
        ),
    ):
        code, details = code_of(method, request, timeout=5)
        assert code is grpc.StatusCode.NOT_FOUND and "no synthesis" in details
    with IntelligenceClient(served.target) as client, pytest.raises(NotFound):
        client.recommend(TEMPLATE, problem(12345))


def test_health_and_reflection(served):
    health = health_pb2_grpc.HealthStub(served.channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(served.channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol(SERVICE_NAME)
    assert described.name == "qis/v1/query.proto"


def test_client_retries_unavailable_until_the_server_is_up(store_url):
    port = free_port()
    records = load(store_url)
    store = open_store(store_url)
    started = []

    def start_late():
        time.sleep(0.6)
        started.append(start_server(store, ServeConfig(port=port)))

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        with IntelligenceClient(f"127.0.0.1:{port}", timeout=10) as client:
            t = time.monotonic()
            got = client.synthesis(address_of(0))
            assert time.monotonic() - t >= 0.5  # it did wait for the server
            assert got.to_record() == records[address_of(0)][0]
        with IntelligenceClient(f"127.0.0.1:{free_port()}", timeout=0.5) as client:
            t = time.monotonic()
            with pytest.raises(Unavailable):
                client.synthesis(address_of(0))
            assert time.monotonic() - t < 2.0  # gave up at its deadline
    finally:
        thread.join()
        for running in started:
            running.stop(grace=None)
        store.close()


class _SlowReads(Store):
    """A SQLite store whose blocking read of one address takes ``pause`` seconds; its async
    reads are the base class's (run the blocking read off the event loop)."""

    def __init__(self, store: Store, slow: str, pause: float):
        self._store, self._slow, self._pause = store, slow, pause
        self.url = store.url

    def entry(self, address, timeout=None):
        if address == self._slow:
            time.sleep(self._pause)
        return self._store.entry(address, timeout)

    def ping(self, timeout=None):
        self._store.ping(timeout)

    def close(self):
        self._store.close()


def test_a_slow_store_read_does_not_hold_up_other_calls(tmp_path):
    """One event loop serves every call: a blocking store read must run off it (the base
    store's async default), or a slow call would stall every other one."""
    url = f"sqlite://{tmp_path}/s.db"
    load(url)
    store = _SlowReads(open_store(url), address_of(0), pause=1.5)
    running = start_server(store, ServeConfig(port=0))
    target = f"127.0.0.1:{running.port}"
    try:
        slow = threading.Thread(target=lambda: IntelligenceClient(target).synthesis(address_of(0)))
        slow.start()
        time.sleep(0.3)  # the slow read is under way
        with IntelligenceClient(target, timeout=5) as client:
            t = time.monotonic()
            assert client.synthesis(address_of(1)).address == address_of(1)
            assert time.monotonic() - t < 0.8
        slow.join()
    finally:
        running.stop(grace=None)
        store.close()


def _health(stub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_postgres_down_is_unavailable_and_the_service_recovers(serving_postgres):
    s = Served(fresh_database(serving_postgres.url))
    health = health_pb2_grpc.HealthStub(s.channel)
    request = query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(0), k=3)
    try:
        assert s.stub.Recommend(request, timeout=5).approaches
        serving_postgres.stop()
        down_at = time.monotonic()
        try:
            code, details = code_of(s.stub.Recommend, request, timeout=10)
            assert code is grpc.StatusCode.UNAVAILABLE and "store unavailable" in details
            assert _wait_for(lambda: _health(health) == health_pb2.HealthCheckResponse.NOT_SERVING)
            # the call's deadline bounds the wait for the store: UNAVAILABLE well within it
            t = time.monotonic()
            request_0 = query_pb2.GetSynthesisRequest(address=address_of(0))
            code, _ = code_of(s.stub.GetSynthesis, request_0, timeout=1.0)
            assert code is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t < 1.0
            with IntelligenceClient(s.target, timeout=0.8) as client, pytest.raises(Unavailable):
                client.recommend(TEMPLATE, problem(0))
            # a long outage: the pool's reconnection backoff must not outlast it
            while time.monotonic() - down_at < 8.0:
                code, _ = code_of(s.stub.Recommend, request, timeout=2)
                assert code is grpc.StatusCode.UNAVAILABLE
                time.sleep(0.5)
        finally:
            serving_postgres.start()
        back_at = time.monotonic()
        with IntelligenceClient(s.target, timeout=10) as client:
            assert client.recommend(TEMPLATE, problem(0)).approaches  # recovers by itself
        assert time.monotonic() - back_at < 3.0
        assert _wait_for(lambda: _health(health) == health_pb2.HealthCheckResponse.SERVING)
    finally:
        s.close()


@pytest.mark.slow
def test_a_postgres_restart_costs_no_call_made_after_it(serving_postgres):
    """Pooled connections broken by a restart are dropped and the read tried again, so a call
    made once the server is back answers at the first attempt (raw stub: no client retry)."""
    s = Served(fresh_database(serving_postgres.url), health_interval_s=60.0)
    request = query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(0), k=3)
    try:
        calls = [threading.Thread(target=s.stub.Recommend, args=(request,)) for _ in range(8)]
        for t in calls:  # several pooled connections
            t.start()
        for t in calls:
            t.join()
        serving_postgres.stop()
        serving_postgres.start()
        for _ in range(8):
            assert s.stub.Recommend(request, timeout=5).approaches
    finally:
        s.close()


def test_serving_an_empty_database_until_a_run_writes_it(pg_server):
    """serve may start before any run created the table: UNAVAILABLE, then answers."""
    url = fresh_database(pg_server)
    store = open_store(url)
    running = start_server(store, ServeConfig(port=0))
    request = query_pb2.GetSynthesisRequest(address=address_of(0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = query_pb2_grpc.IntelligenceServiceStub(channel)
            code, details = code_of(stub.GetSynthesis, request, timeout=5)
            assert code is grpc.StatusCode.UNAVAILABLE and "no synthesis table" in details
            load(url)
            assert stub.GetSynthesis(request, timeout=5).synthesis.address == address_of(0)
    finally:
        running.stop(grace=None)
        store.close()


def test_sqlite_store_gone_is_unavailable_and_the_service_recovers(tmp_path):
    path = tmp_path / "intelligence.db"
    s = Served(f"sqlite://{path}")
    request = query_pb2.GetSynthesisRequest(address=address_of(0))
    try:
        os.rename(path, tmp_path / "aside.db")
        code, _ = code_of(s.stub.GetSynthesis, request, timeout=5)
        assert code is grpc.StatusCode.UNAVAILABLE
        os.rename(tmp_path / "aside.db", path)
        assert s.stub.GetSynthesis(request, timeout=5).synthesis.address == address_of(0)
    finally:
        s.close()


@pytest.mark.slow
def test_cli_serve_and_query_server(tmp_path, capsys):
    from qis_beam.cli import main

    db = tmp_path / "intelligence.db"
    records = load(f"sqlite://{db}")
    (tmp_path / "tokens").write_text("# rotation: one a line\nt0ken\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qis_beam.cli",
            "serve",
            "--store",
            str(db),
            "--port",
            "0",
            "--token-file",
            str(tmp_path / "tokens"),
            "--processes",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    children = []
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {SERVICE_NAME} on 127.0.0.1:"), line
        assert "2 processes" in line
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert children  # the second server process shares the port
        target = line.split(" on ", 1)[1].split(" ", 1)[0]
        token = ["--token-file", str(tmp_path / "tokens")]
        address = address_of(2)
        assert main(["query", "--server", target, *token, "--address", address]) == 0
        assert __import__("json").loads(capsys.readouterr().out) == records[address][0]
        context = [f"{k}={v}" for k, v in problem(2).items()]
        assert (
            main(
                [
                    "query",
                    "--server",
                    target,
                    *token,
                    "--template",
                    TEMPLATE,
                    "--context",
                    *context,
                    "--window",
                ]
            )
            == 0
        )
        assert __import__("json").loads(capsys.readouterr().out) == records[address][1:]
        assert main(["query", "--server", target, *token, "--address", "0" * 64]) == 3
        assert main(["query", "--server", target, "--address", address, "--timeout", "2"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0
    # stopped with the parent (the server process, and multiprocessing's resource tracker,
    # which leaves once its parent is gone)
    assert _wait_for(lambda: not any(_alive(pid) for pid in children), 10.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["serve", "--store", "mysql://h/db"],
        ["serve", "--store", "x.db", "--tls-cert", "c.pem"],
        ["serve", "--store", "x.db", "--token-file", "/nonexistent/tokens"],
        ["serve", "--store", "x.db", "--port", "-1"],
        ["query", "--store", "x.db", "--server", "h:1", "--address", "0" * 64],
        ["backfill", "--input", "x", "--output", "y", "--store", "ftp://x"],
    ],
)
def test_bad_serving_arguments_are_one_line_and_exit_2(argv, capsys):
    from qis_beam.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qis-beam") and "\n" not in err
