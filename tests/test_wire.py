"""The wire module: decoding, outcome names, the corrupt-tail rule; backfill (FnApiRunner)
and replay (BundleBasedDirectRunner) give the same dead letters for the same bytes."""

from __future__ import annotations

import base64
import os

import pytest
from conftest import HOUR_MS, T0_MS, fnapi_options, make_packet, make_record, node_key

from qis_beam.emitter import seal
from qis_beam.positions import FRAMING, iter_framed, open_log
from qis_beam.tfrecords import CorruptRecordFile, split_records, write_record
from qis_beam.validation import ValidationPolicy, validate
from qis_beam.wire import (
    MAX_CORRUPT_TAIL_BYTES,
    OPEN,
    OUTCOME_NAMES,
    SCORE_BY_TYPE,
    Envelope,
    WireError,
    corrupt_tail,
    corrupt_tail_source,
    decode_envelope,
    decode_packet,
    decode_record,
    decode_signed,
    iter_packets,
    payload_of,
    split_corrupt_tail,
)

NOW = T0_MS + 48 * HOUR_MS


def test_decode_record_returns_the_signed_payload_and_its_packet():
    record = make_record(node_key(1), packet_id=bytes(range(16)), approach_id="warmup=100")
    envelope, packet = decode_record(record)
    assert envelope.payload == payload_of(record) == decode_envelope(record).payload
    assert packet == decode_packet(envelope.payload)
    assert packet.approach_id == "warmup=100" and packet.packet_id == bytes(range(16))


@pytest.mark.parametrize(
    "record",
    [
        b"\xff\xff\xff",  # not an Envelope
        Envelope(payload=b"\x0a\x05ab").SerializeToString(),  # payload truncated
        Envelope(payload=b"\x2a\x02\xc3\x28").SerializeToString(),  # bad UTF-8
    ],
)
def test_undecodable_bytes_raise_one_error_type(record):
    with pytest.raises(WireError, match="not a qis.v1 Envelope/OutcomePacket"):
        decode_record(record)
    verdict = validate(record, ValidationPolicy(allow_unsigned=True, now_ms=NOW))
    assert verdict.reason == "undecodable"


def test_outcome_names_come_from_the_proto_enum():
    assert OUTCOME_NAMES == {1: "RESOLVED", 2: "PARTIAL", 3: "CONTRADICTED", 4: "OPEN"}
    assert SCORE_BY_TYPE[0] is None and SCORE_BY_TYPE[OPEN] is None
    assert SCORE_BY_TYPE[1:4] == (1.0, 0.5, 0.0)


def test_corrupt_tail_is_cut_and_names_the_bytes_it_could_not_frame(tmp_path):
    good = make_record(node_key(1))
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        write_record(f, good)
    data = path.read_bytes() + os.urandom(2 * MAX_CORRUPT_TAIL_BYTES)
    records, error = split_records(data)
    assert records == [good]
    detail, tail = corrupt_tail(error, len(data))
    assert tail == data[error.offset :][:MAX_CORRUPT_TAIL_BYTES]
    assert detail.startswith(f"corrupt TFRecord framing at byte {error.offset}: ")
    assert f"({2 * MAX_CORRUPT_TAIL_BYTES} bytes) cannot be framed" in detail
    source = corrupt_tail_source(str(path), detail)
    assert split_corrupt_tail(source) == (str(path), detail)
    assert split_corrupt_tail(str(path)) == (str(path), None)


# --- the same bytes through backfill and replay ---------------------------------------------


def _shard_with_bad_records_and_corrupt_tail(path) -> None:
    key = node_key(1)
    records = [
        make_record(
            key,
            packet_id=i.to_bytes(16, "big"),
            event_time_ms=T0_MS + i * 60_000,
            emit_time_ms=T0_MS + i * 60_000,
        )
        for i in range(6)
    ]
    records += [
        b"\x00not a packet",  # undecodable
        make_record(key, packet_id=b"\x01" * 16, approach_id="x" * 2000),  # oversize
        seal(None, make_packet(key, packet_id=b"\x02" * 16)),  # unsigned
        make_record(key, packet_id=b"\x03" * 16, template_id="Bad Template"),  # invalid_field
        make_record(  # future_event_time
            key, packet_id=b"\x04" * 16, event_time_ms=NOW + HOUR_MS, emit_time_ms=NOW + HOUR_MS
        ),
    ]
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
        # A tail longer than both the packet size limit and the dead letter's cut: the
        # replay used to validate it as an envelope and name it "oversize".
        f.write(os.urandom(3 * MAX_CORRUPT_TAIL_BYTES))


def _letters(output) -> list[tuple]:
    from qis_beam.transforms.outputs import read_json_lines

    return sorted(
        (d["reason"], d["detail"], d["record_b64"], d["packet_id"], d["source"])
        for d in read_json_lines(output, "dead_letters")
    )


@pytest.mark.slow
def test_backfill_and_replay_give_the_same_dead_letters_for_the_same_bytes(tmp_path):
    from qis_beam.jobs import run_job, run_replay
    from qis_beam.pipelines.backfill import build_backfill
    from qis_beam.settings import Settings

    path = tmp_path / "packets-0.tfrecord"
    _shard_with_bad_records_and_corrupt_tail(path)
    settings = Settings(validation=ValidationPolicy(now_ms=NOW))
    batch_out, replay_out = str(tmp_path / "backfill"), str(tmp_path / "replay")
    batch = run_job(
        lambda p: build_backfill(p, str(path), batch_out, settings), batch_out, fnapi_options()
    )
    replay, _ = run_replay(
        [str(path)], replay_out, settings, ["--runner", "BundleBasedDirectRunner"]
    )

    letters = _letters(batch_out)
    assert letters == _letters(replay_out)
    assert [r for r, *_ in letters] == sorted(
        ["undecodable", "oversize", "unsigned", "invalid_field", "future_event_time", "undecodable"]
    )
    tail = [d for d in letters if "cannot be framed" in d[1]]
    assert len(tail) == 1 and tail[0][0] == "undecodable" and tail[0][4] == str(path)
    assert len(base64.b64decode(tail[0][2])) == MAX_CORRUPT_TAIL_BYTES
    for summary in (batch, replay):
        assert summary["records_in"] == 6 + 5 + 1 and summary["valid"] == 6
        assert summary["balanced"] is True


def test_decode_signed_and_iter_packets_agree_with_decode_record():
    records = [make_record(node_key(i), packet_id=bytes([i]) * 16) for i in range(1, 4)]
    records.append(seal(None, make_packet(node_key(1), approach_id="warmup=10")))
    for record in records:
        envelope, packet = decode_record(record)
        assert decode_signed(record) == (
            envelope.payload,
            envelope.signature,
            envelope.public_key,
            packet,
        )
    with pytest.raises(WireError):
        decode_signed(b"\xff\xff\xff")
    payloads = [payload_of(r) for r in records]
    # one message re-filled per payload: fields are read before the next one is decoded
    ids = [(p.packet_id, p.approach_id) for p in iter_packets(payloads)]
    assert ids == [(decode_packet(p).packet_id, decode_packet(p).approach_id) for p in payloads]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d, at: _flip(d, at + 1), "length checksum mismatch"),  # length
        (lambda d, at: _flip(d, at + 9), "length checksum mismatch"),  # length's checksum
        (lambda d, at: _flip(d, at + 20), "data checksum mismatch"),  # record
        (lambda d, at: d[: at + 30], "truncated record"),
        (lambda d, at: d[: at + 5], "truncated length header"),
    ],
)
def test_both_framing_readers_stop_at_the_same_byte_for_the_same_reason(tmp_path, damage, reason):
    """Backfill frames with positions.iter_framed, replay with tfrecords.split_records: the
    corrupt-tail dead letter is the same only if both stop where and why the other does."""
    records = [make_record(node_key(1), packet_id=bytes([i]) * 16) for i in range(5)]
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    data = path.read_bytes()
    at = 3 * (len(records[0]) + FRAMING)  # the fourth record's header (all are one size)
    damaged = damage(data, at)
    path.write_bytes(damaged)
    framed, in_memory_error = split_records(damaged)
    assert framed == records[:3] and in_memory_error.offset == at
    with open_log(str(path)) as handle, pytest.raises(CorruptRecordFile) as error:
        for _ in iter_framed(handle):
            pass
    assert (error.value.offset, str(error.value)) == (at, str(in_memory_error))
    assert reason in str(error.value)
    assert corrupt_tail(error.value, len(damaged)) == corrupt_tail(in_memory_error, len(damaged))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]
