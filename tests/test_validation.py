"""Each ingestion check of spec section 4, their order, and robustness to any input."""

from __future__ import annotations

import math

import pytest
from conftest import HOUR_MS, T0_MS, make_packet, make_record, node_key
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam.emitter import seal
from qis_beam.signing import ThreadedVerifier
from qis_beam.validation import (
    INGEST_REASONS,
    Accepted,
    Rejection,
    ValidationPolicy,
    validate,
    validate_batch,
)
from qis_beam.wire import MINUTE_MS, Envelope, payload_of

NOW = T0_MS + 10_000
POLICY = ValidationPolicy(now_ms=NOW)


def reason(record: bytes, policy: ValidationPolicy = POLICY) -> str | None:
    verdict = validate(record, policy)
    return verdict.reason if isinstance(verdict, Rejection) else None


def envelope(payload: bytes, signature: bytes = b"", public_key: bytes = b"") -> bytes:
    return Envelope(payload=payload, signature=signature, public_key=public_key).SerializeToString()


def test_valid_signed_packet_is_accepted():
    verdict = validate(make_record(), POLICY)
    assert isinstance(verdict, Accepted)
    assert verdict.packet.approach_id == "lr_schedule=cosine"
    assert verdict.payload == payload_of(make_record())


def test_oversize():
    record = make_record(metrics={f"m{i}": 1.0 for i in range(8)}, context_embedding=[0.5] * 64)
    assert len(record) > 300
    assert reason(record, ValidationPolicy(now_ms=NOW, max_packet_bytes=300)) == "oversize"
    assert reason(record, ValidationPolicy(now_ms=NOW, max_packet_bytes=len(record))) is None


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x03\xff\xff\xff"])
def test_undecodable(raw):
    assert reason(raw) == "undecodable"


def test_unsigned_unless_allowed():
    key = node_key(1)
    record = seal(None, make_packet(key), public_key=key.public_key)
    assert reason(record) == "unsigned"
    assert reason(record, ValidationPolicy(now_ms=NOW, allow_unsigned=True)) is None


def test_bad_signature_even_when_unsigned_allowed():
    key, other = node_key(1), node_key(2)
    payload = make_packet(key).SerializeToString()
    forged = envelope(payload, other.sign(payload), key.public_key)
    assert reason(forged) == "bad_signature"
    assert reason(forged, ValidationPolicy(now_ms=NOW, allow_unsigned=True)) == "bad_signature"
    truncated = envelope(payload, key.sign(payload)[:10], key.public_key)
    assert reason(truncated) == "bad_signature"
    short_key = envelope(payload, key.sign(payload), key.public_key[:5])
    assert reason(short_key) == "bad_signature"


def test_unsupported_version():
    assert reason(make_record(**{})) is None
    packet = make_packet()
    packet.schema_version = 2
    assert reason(seal(node_key(1), packet)) == "unsupported_version"


def test_node_id_mismatch():
    key = node_key(1)
    packet = make_packet(key)
    packet.node_id = node_key(2).node_id
    assert reason(seal(key, packet)) == "node_id_mismatch"
    packet.node_id = key.node_id[:8]
    assert reason(seal(key, packet)) == "node_id_mismatch"


def test_unknown_node_only_with_registry():
    record = make_record(node_key(3))
    registry = frozenset({node_key(1).public_key})
    assert reason(record, ValidationPolicy(now_ms=NOW, registry=registry)) == "unknown_node"
    assert reason(record) is None
    assert reason(make_record(node_key(1)), ValidationPolicy(now_ms=NOW, registry=registry)) is None


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"packet_id": b"short"}, "packet_id"),
        ({"address": b"x" * 31}, "semantic_address"),
        ({"template_id": "Upper/v1"}, "template_id"),
        ({"template_id": "x" * 65}, "template_id"),
        ({"approach_id": "-leading-dash"}, "approach_id"),
        ({"approach_id": "free text"}, "approach_id"),
        ({"approach_id": ""}, "approach_id"),
        ({"outcome_type": 0}, "outcome_type"),
        ({"outcome_type": 5}, "outcome_type"),  # the first number past the enum
        ({"outcome_type": 9}, "outcome_type"),
        ({"outcome_delta": math.inf}, "outcome_delta"),
        ({"outcome_delta": math.nan}, "outcome_delta"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": -0.1}, "confidence"),
        ({"confidence": math.nan}, "confidence"),
        ({"event_time_ms": 0, "emit_time_ms": 0}, "event_time_ms"),
        ({"emit_time_ms": T0_MS - 6 * MINUTE_MS}, "emit_time_ms"),
        ({"metrics": {f"m{i}": 1.0 for i in range(9)}}, "metrics"),
        ({"metrics": {"loss": math.inf}}, "metrics"),
        ({"context_embedding": [0.0] * 65}, "context_embedding"),
        ({"context_embedding": [math.nan]}, "context_embedding"),
    ],
)
def test_invalid_field_names_the_field(fields, field_name):
    verdict = validate(make_record(**fields), ValidationPolicy(now_ms=NOW, max_packet_bytes=4096))
    assert isinstance(verdict, Rejection)
    assert verdict.reason == "invalid_field"
    assert field_name in verdict.detail


def test_limits_are_inclusive():
    record = make_record(
        metrics={f"m{i}": 1.0 for i in range(8)},
        context_embedding=[0.1] * 64,
        confidence=1.0,
        approach_id="a" * 64,
        template_id="t" * 64,
        emit_time_ms=T0_MS - 5 * MINUTE_MS,
    )
    assert reason(record, ValidationPolicy(now_ms=NOW, max_packet_bytes=4096)) is None


def test_future_event_time_uses_clock_and_skew():
    skew = 5 * MINUTE_MS
    at_limit = make_record(event_time_ms=NOW + skew, emit_time_ms=NOW + skew)
    beyond = make_record(event_time_ms=NOW + skew + 1, emit_time_ms=NOW + skew + 1)
    assert reason(at_limit) is None
    assert reason(beyond) == "future_event_time"


def test_multi_defect_records_name_the_first_failing_check():
    key, other = node_key(1), node_key(2)
    registry = frozenset({key.public_key})
    strict = ValidationPolicy(now_ms=NOW, registry=registry, max_packet_bytes=400)

    huge_forgery = envelope(b"\x0a" + b"x" * 500, b"s" * 64, key.public_key)
    assert reason(huge_forgery, strict) == "oversize"

    bad_version = make_packet(key, confidence=7.0)
    bad_version.schema_version = 3
    assert reason(seal(None, bad_version, public_key=key.public_key), strict) == "unsigned"
    payload = bad_version.SerializeToString()
    assert reason(envelope(payload, other.sign(payload), key.public_key), strict) == "bad_signature"
    assert reason(seal(key, bad_version), strict) == "unsupported_version"

    stranger = node_key(9)
    mismatched = make_packet(stranger, confidence=7.0)
    mismatched.node_id = key.node_id
    assert reason(seal(stranger, mismatched), strict) == "node_id_mismatch"
    assert reason(make_record(stranger, confidence=7.0), strict) == "unknown_node"
    future_and_invalid = make_record(
        key, confidence=7.0, event_time_ms=NOW * 2, emit_time_ms=NOW * 2
    )
    assert reason(future_and_invalid, strict) == "invalid_field"


def _check_verdict(verdict) -> None:
    assert isinstance(verdict, Accepted | Rejection)
    if isinstance(verdict, Rejection):
        assert verdict.reason in INGEST_REASONS
        assert verdict.detail


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(raw):
    _check_verdict(validate(raw, POLICY))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.integers(0, 10_000),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutations_of_valid_records_never_raise(mutations):
    data = bytearray(make_record())
    for kind, at, blob in mutations:
        at %= max(len(data), 1)
        if kind == "flip" and data:
            data[at] ^= blob[0] or 1
        elif kind == "cut":
            del data[at : at + len(blob)]
        else:
            data[at:at] = blob
    verdict = validate(bytes(data), POLICY)
    _check_verdict(verdict)
    policy_unsigned = ValidationPolicy(now_ms=NOW, allow_unsigned=True)
    _check_verdict(validate(bytes(data), policy_unsigned))


def _mixed_batch() -> list[bytes]:
    """Valid, forged, unsigned, truncated and out-of-range records, interleaved."""
    good = make_record()
    forged = bytearray(good)
    forged[-40] ^= 0x01  # inside the signature or key: verification must fail
    key = node_key(2)
    unsigned = seal(None, make_packet(key), public_key=key.public_key)
    future = make_record(event_time_ms=NOW + HOUR_MS, emit_time_ms=NOW + HOUR_MS)
    other_node = make_record(node_key(3))
    return [good, bytes(forged), unsigned, good[:-3], future, b"\xff", other_node] * 60


@pytest.mark.parametrize("allow_unsigned", [False, True])
def test_batch_validation_gives_the_per_record_verdicts(allow_unsigned):
    policy = ValidationPolicy(now_ms=NOW, allow_unsigned=allow_unsigned)
    records = _mixed_batch()
    expected = [validate(record, policy) for record in records]
    assert {type(v) for v in expected} == {Accepted, Rejection}
    verifier = ThreadedVerifier(threads=3)
    verifier.MIN_PER_THREAD = 4  # force the thread pool on this small batch
    try:
        assert validate_batch(records, policy, NOW, verifier) == expected
        assert validate_batch(records, policy, NOW) == expected
    finally:
        verifier.close()
    reasons = {v.reason for v in expected if isinstance(v, Rejection)}
    assert {"bad_signature", "undecodable", "future_event_time"} <= reasons
