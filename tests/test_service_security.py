"""The query service's edges: TLS, bearer tokens, and a flood of bad or unauthenticated
requests that must leave good ones answered."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from served import PROBLEMS, Served, code_of
from serving_data import TEMPLATE, address_of, problem

from qis_beam.client import (
    IntelligenceClient,
    Unauthenticated,
    Unavailable,
)
from qis_beam.proto import query_pb2, query_pb2_grpc


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
