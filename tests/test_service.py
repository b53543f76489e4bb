"""The gRPC query service and its client, against SQLite and a real PostgreSQL server:
every RPC, every error status, health and reflection, deadlines, TLS, bearer tokens, a
store that goes down and comes back, and a flood of bad requests.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pg_local import free_port, fresh_database
from serving_data import TEMPLATE, address_of, problem, records_for

from qis_beam.client import (
    IntelligenceClient,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from qis_beam.proto import query_pb2, query_pb2_grpc
from qis_beam.service.server import SERVICE_NAME, ServeConfig, start_server
from qis_beam.store import open_store

PROBLEMS = 3


def load(url: str) -> dict[str, list[dict]]:
    by_address = {}
    with open_store(url, create=True) as store:
        for i in range(PROBLEMS):
            records = records_for(i)
            store.load(records, "backfill-test")
            by_address[address_of(i)] = records
    # a suppressed address (privacy guard): counts only
    with open_store(url, create=True) as store:
        store.load(records_for(99, packets=2, min_nodes=50), "backfill-test")
    return by_address


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/intelligence.db"
    return fresh_database(request.getfixturevalue("pg_server"))


class Served:
    def __init__(self, url: str, **config):
        self.records = load(url)
        self.store = open_store(url)
        config.setdefault("health_interval_s", 0.2)
        self.config = ServeConfig(port=0, **config)
        self.running = start_server(self.store, self.config)
        self.target = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = query_pb2_grpc.IntelligenceServiceStub(self.channel)

    def close(self):
        self.channel.close()
        self.running.stop(grace=None)
        self.store.close()


@pytest.fixture
def served(store_url):
    s = Served(store_url)
    yield s
    s.close()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


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


def _health(stub) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


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


def self_signed(tmp_path) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return cert_pem, key_pem


def test_tls_and_bearer_token(tmp_path):
    cert, key = self_signed(tmp_path)
    s = Served(f"sqlite://{tmp_path}/s.db", tls_cert=cert, tls_key=key, tokens=(b"s3cret", b"next"))
    try:
        for token in ("s3cret", "next"):  # several tokens: rotation
            with IntelligenceClient(s.target, token=token, tls_root_cert=cert) as client:
                assert client.recommend(TEMPLATE, problem(0)).best is not None
        # the root certificate as a file, as `qis-beam query --tls-root-cert` passes it
        with IntelligenceClient(
            s.target, token="s3cret", tls_root_cert=str(tmp_path / "cert.pem")
        ) as client:
            assert client.synthesis(address_of(1)).address == address_of(1)
        for token in (None, "wrong", "s3cre", "s3cret2", ""):
            with IntelligenceClient(s.target, token=token, tls_root_cert=cert) as client:
                with pytest.raises(Unauthenticated):
                    client.recommend(TEMPLATE, problem(0))
        secure = grpc.secure_channel(s.target, grpc.ssl_channel_credentials(cert))
        # health and reflection need the token too
        code, _ = code_of(
            health_pb2_grpc.HealthStub(secure).Check, health_pb2.HealthCheckRequest(), timeout=5
        )
        assert code is grpc.StatusCode.UNAUTHENTICATED
        reply = health_pb2_grpc.HealthStub(secure).Check(
            health_pb2.HealthCheckRequest(),
            timeout=5,
            metadata=(("authorization", "Bearer s3cret"),),
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        secure.close()
        # plaintext to a TLS port: no answer
        with IntelligenceClient(s.target, token="s3cret", timeout=1) as client:
            with pytest.raises(Unavailable):
                client.recommend(TEMPLATE, problem(0))
    finally:
        s.close()


def test_flood_of_bad_and_unauthenticated_requests_leaves_good_ones_answered(tmp_path):
    s = Served(f"sqlite://{tmp_path}/s.db", tokens=(b"good-token",), workers=8)
    stop = threading.Event()
    flooded = [0]

    def flood(kind: int):
        channel = grpc.insecure_channel(s.target)
        stub = query_pb2_grpc.IntelligenceServiceStub(channel)
        requests = [
            (query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(0)), ()),
            (
                query_pb2.RecommendRequest(template_id="BAD"),
                (("authorization", "Bearer good-token"),),
            ),
            (
                query_pb2.RecommendRequest(template_id=TEMPLATE, context=problem(0)),
                (("authorization", "Bearer nope"),),
            ),
        ]
        request, metadata = requests[kind % len(requests)]
        while not stop.is_set():
            try:
                stub.Recommend(request, timeout=2, metadata=metadata)
            except grpc.RpcError as error:
                assert error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ), error
                flooded[0] += 1
        channel.close()

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    good, slowest = 0, 0.0
    try:
        with IntelligenceClient(s.target, token="good-token", timeout=5) as client:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                assert client.recommend(TEMPLATE, problem(good % PROBLEMS)).best is not None
                slowest = max(slowest, time.monotonic() - t0)
                good += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        s.close()
    assert flooded[0] > 10 * good > 0 or flooded[0] > 1000, (flooded[0], good)
    assert slowest < 2.0


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
