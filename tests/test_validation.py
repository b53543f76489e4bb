"""Each ingestion check of spec section 4, their order, and robustness to any input."""

from __future__ import annotations

import math

import numpy as np
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
    validate_records,
)
from qis_beam.wire import MINUTE_MS, Envelope, payload_of, scan_records

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


# ------------------------------------------- column-wise validation (the backfill's path)
# validate_many judges the usual record shape with numpy and hands every other record to
# validate(): its verdicts must be validate()'s, record for record, whatever the input.


def assert_same_as_per_record(records: list[bytes], policy: ValidationPolicy, now: int = NOW):
    expected = [validate(record, policy, now) for record in records]
    got = validate_records(records, policy, now)
    accepted = [v for v in expected if isinstance(v, Accepted)]
    assert got.valid.tolist() == [isinstance(v, Accepted) for v in expected]
    assert got.payloads == [v.payload for v in accepted]
    assert [bytes(p) for p in got.packet_ids] == [v.packet.packet_id for v in accepted]
    assert got.rejections == [(i, v) for i, v in enumerate(expected) if isinstance(v, Rejection)]
    return got


def fast_rows(records: list[bytes]) -> list[bool]:
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    ends = np.cumsum(lengths)
    return scan_records(b"".join(records), ends - lengths, ends).ok.tolist()


SKEW = 5 * MINUTE_MS
# Each field: valid values (edge ones among them), then values some check must reject.
FIELD_VALUES = {
    "packet_id": ([bytes(range(16)), b"\xff" * 16], [b"", b"x" * 15, b"y" * 17]),
    "address": ([bytes(32), b"\x80" * 32], [b"a" * 31, b"b" * 33, b""]),
    "template_id": (["llm-finetune/v1", "x:y/z-1.2_3", "t" * 64], ["t" * 65, "", "Up", "é", "t\0"]),
    "approach_id": (
        ["lr=1", "ok+x=/:.-_9", "a" * 64, "9"],
        ["a" * 65, "", "-bad", "free text", "é", "\x7f"],
    ),
    "outcome_type": ([1, 2, 3, 4], [0, 5, 127, 128, 2**31 - 1, -1]),
    "outcome_delta": ([0.04, 0.0, -0.0, -1e300, 5e-324], [math.inf, -math.inf, math.nan]),
    "confidence": ([0.8, 0.0, -0.0, 1.0, 1e-40], [1.0000001, -0.1, math.inf, math.nan]),
    "sample_count": ([100, 0, 2**32 - 1], []),
    "event_time_ms": ([T0_MS, 1, NOW + SKEW], [0, -5, NOW + SKEW + 1, 2**56, 2**63 - 1]),
    "emit_shift": ([1000, 0, -SKEW, 2**40], [-SKEW - 1, None]),
    "metrics": (
        [{}, {"loss": 0.5}, {f"m{i}": float(i) for i in range(8)}, {"": -0.0, "é": 1e300}],
        [{f"m{i}": 1.0 for i in range(9)}, {"loss": math.nan}, {"k": -math.inf}],
    ),
    "context_embedding": ([[], [0.5, -0.0], [0.25] * 64], [[0.25] * 65, [math.nan], [1e39]]),
}
packet_fields = st.fixed_dictionaries(
    {name: st.sampled_from(good) for name, (good, _) in FIELD_VALUES.items()}
).flatmap(
    lambda fields: st.lists(
        st.sampled_from([(n, v) for n, (_, bad) in FIELD_VALUES.items() for v in bad]),
        max_size=2,
    ).map(lambda defects: {**fields, **dict(defects)})
)
envelope_kind = st.sampled_from(
    ["signed", "signed", "unsigned", "unsigned", "unsigned-no-key", "forged", "odd-key"]
)


def record_of(fields: dict, kind: str, node: int = 1, node_id: bytes | None = None) -> bytes:
    fields = dict(fields)
    shift = fields.pop("emit_shift")
    event = fields["event_time_ms"]
    fields["emit_time_ms"] = 0 if shift is None else max(-(2**63), min(event + shift, 2**63 - 1))
    key = node_key(node)
    packet = make_packet(key, **fields)
    if node_id is not None:
        packet.node_id = node_id
    payload = packet.SerializeToString(deterministic=True)
    if kind == "signed":
        return envelope(payload, key.sign(payload), key.public_key)
    if kind == "forged":
        return envelope(payload, node_key(node + 1).sign(payload), key.public_key)
    if kind == "odd-key":
        return envelope(payload, b"", key.public_key[:31])
    return envelope(payload, b"", key.public_key if kind == "unsigned" else b"")


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(
        st.tuples(
            packet_fields,
            envelope_kind,
            st.integers(1, 3),
            st.sampled_from([None, None, None, None, b"\x01" * 16, b"\x02" * 8]),
        ),
        min_size=1,
        max_size=12,
    ),
    allow_unsigned=st.booleans(),
    registry=st.sampled_from([None, (1,), (1, 2)]),
    max_bytes=st.sampled_from([1024, 200, 4096]),
    skew=st.sampled_from([SKEW, 0, 2**62 - 1, 2**62, 2**63, 10**30]),
)
def test_column_wise_verdicts_are_the_per_record_ones(
    batch, allow_unsigned, registry, max_bytes, skew
):
    records = [record_of(f, kind, node, nid) for f, kind, node, nid in batch]
    keys = None if registry is None else frozenset(node_key(i).public_key for i in registry)
    policy = ValidationPolicy(
        now_ms=NOW,
        allow_unsigned=allow_unsigned,
        registry=keys,
        max_packet_bytes=max_bytes,
        max_clock_skew_ms=skew,
    )
    assert_same_as_per_record(records, policy)


@settings(max_examples=400, deadline=None)
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "set"]),
            st.integers(0, 10_000),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=3,
    ),
    signed=st.booleans(),
)
def test_column_wise_verdicts_of_mutated_records(mutations, signed):
    key = node_key(1)
    packet = make_packet(key, metrics={"loss": 0.5, "acc": 0.9}, context_embedding=[0.5] * 3)
    good = seal(key if signed else None, packet, public_key=key.public_key)
    data = bytearray(good)
    for kind, at, blob in mutations:
        at %= max(len(data), 1)
        if kind == "flip" and data:
            data[at] ^= blob[0] or 1
        elif kind == "set" and data:
            data[at] = blob[0]
        elif kind == "cut":
            del data[at : at + len(blob)]
        else:
            data[at:at] = blob
    policy = ValidationPolicy(now_ms=NOW, allow_unsigned=True)
    assert_same_as_per_record([good, bytes(data), good, bytes(data)[:-1]], policy)


def test_usual_records_take_the_column_wise_path():
    """The fast path is not vacuous: the records the emitter writes take it, signed or not,
    with metrics and an embedding, and so do the mixed batch's valid ones."""
    key = node_key(1)
    usual = [
        make_record(),
        seal(None, make_packet(key), public_key=key.public_key),
        make_record(metrics={f"m{i}": float(i) for i in range(8)}, context_embedding=[0.1] * 64),
        make_record(outcome_delta=0.0, confidence=0.0, sample_count=0),
        make_record(template_id="t" * 64, approach_id="a" * 64),
    ]
    assert fast_rows(usual) == [True] * len(usual)
    policy = ValidationPolicy(now_ms=NOW, max_packet_bytes=4096, allow_unsigned=True)
    got = assert_same_as_per_record(usual, policy)
    assert got.valid.all() and not got.rejections


@pytest.mark.parametrize("allow_unsigned", [False, True])
def test_column_wise_verdicts_of_the_mixed_batch(allow_unsigned):
    policy = ValidationPolicy(now_ms=NOW, allow_unsigned=allow_unsigned)
    records = _mixed_batch()
    got = assert_same_as_per_record(records, policy)
    verifier = ThreadedVerifier(threads=3)
    verifier.MIN_PER_THREAD = 4
    try:
        threaded = validate_records(records, policy, NOW, verifier)
    finally:
        verifier.close()
    assert threaded.valid.tolist() == got.valid.tolist()
    assert (threaded.payloads, threaded.rejections) == (got.payloads, got.rejections)
    assert threaded.packet_ids.tolist() == got.packet_ids.tolist()
    assert validate_records([], policy, NOW).rejections == []
