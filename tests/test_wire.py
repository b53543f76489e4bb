"""The wire module: decoding, outcome names, the corrupt-tail rule; backfill (FnApiRunner)
and replay (BundleBasedDirectRunner) give the same dead letters for the same bytes."""

from __future__ import annotations

import base64
import math
import os

import numpy as np
import pytest
from conftest import HOUR_MS, T0_MS, fnapi_options, make_packet, make_record, node_key
from hypothesis import given, settings
from hypothesis import strategies as st

from qis_beam import positions
from qis_beam.emitter import seal
from qis_beam.partials import PacketColumns
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
    scan_records,
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


# ------------------------------------------------------ many records at once (backfill)


def _scanned(records: list[bytes]):
    lengths = np.array([len(r) for r in records], dtype=np.int64)
    ends = np.cumsum(lengths)
    return scan_records(b"".join(records), ends - lengths, ends)


_values = st.sampled_from([0.0, -0.0, 0.25, -3.5, 1e300, 5e-324, math.inf, math.nan])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "template_id": st.text("abc/:-._01", min_size=1, max_size=64),
                "approach_id": st.text("abc=+01", min_size=1, max_size=64),
                "outcome_type": st.integers(1, 4),
                "outcome_delta": _values,
                "confidence": _values,
                "sample_count": st.sampled_from([0, 1, 2**32 - 1]),
                "event_time_ms": st.integers(1, 2**56 - 1),
                "emit_time_ms": st.integers(0, 2**56 - 1),
                "metrics": st.dictionaries(st.text("xyz_", max_size=20), _values, max_size=8),
                "context_embedding": st.lists(_values, max_size=64),
                "packet_id": st.binary(min_size=16, max_size=16),
            }
        ),
        min_size=1,
        max_size=6,
    ),
    st.booleans(),
)
def test_scanned_columns_are_what_protobuf_decodes(fields, signed):
    key = node_key(1)
    packets = [make_packet(key, **f) for f in fields]
    records = [seal(key if signed else None, p, public_key=key.public_key) for p in packets]
    scan = _scanned(records)
    assert scan.ok.all()
    data = scan.buffer
    for i, record in enumerate(records):
        envelope, packet = decode_record(record)
        p0, pe = int(scan.payload_start[i]), int(scan.payload_end[i])
        assert data[p0:pe] == envelope.payload
        assert bool(scan.signed[i]) == bool(envelope.signature)
        assert data[pe + 2 : pe + 66] == envelope.signature or not envelope.signature
        key_at = int(scan.public_key_start[i])
        assert data[key_at : key_at + 32] == envelope.public_key
        assert data[p0 + 4 : p0 + 20] == packet.packet_id
        assert data[p0 + 22 : p0 + 38] == packet.node_id
        assert data[p0 + 40 : p0 + 72] == packet.semantic_address
        for (start, length), value in (
            (scan.template_id, packet.template_id),
            (scan.approach_id, packet.approach_id),
        ):
            assert data[start[i] : start[i] + length[i]].decode() == value
        assert scan.outcome_type[i] == packet.outcome_type
        got = (float(scan.outcome_delta[i]), float(scan.confidence[i]))
        assert repr(got) == repr((packet.outcome_delta, packet.confidence))  # nan-safe
        assert (scan.event_time_ms[i], scan.emit_time_ms[i]) == (
            packet.event_time_ms,
            packet.emit_time_ms,
        )
        assert scan.metrics[i] == len(packet.metrics)
        assert scan.metrics_finite[i] == all(map(math.isfinite, packet.metrics.values()))
        assert scan.embedding[i] == len(packet.context_embedding)
        assert scan.embedding_finite[i] == all(map(math.isfinite, packet.context_embedding))


def test_records_of_other_shapes_are_left_to_protobuf():
    """Valid protobuf the scan does not read: flagged, never misread."""
    good = make_record()
    envelope, packet = decode_record(good)
    out_of_order = Envelope(public_key=envelope.public_key).SerializeToString() + (
        Envelope(payload=envelope.payload, signature=envelope.signature).SerializeToString()
    )
    repeated = good + Envelope(public_key=envelope.public_key).SerializeToString()
    n = len(envelope.payload)  # its length as a three-byte varint (protobuf takes those)
    long_varint = b"\x0a" + bytes([n & 0x7F | 0x80, n >> 7 | 0x80, 0]) + good[3:]
    unknown_field = seal(node_key(1), packet)[:-34] + b"\x20\x01" + good[-34:]
    big_time = make_record(event_time_ms=2**56, emit_time_ms=2**56)
    odd_key = make_record(metrics={"é": 1.0})
    scan = _scanned([good, out_of_order, repeated, long_varint, unknown_field, big_time])
    assert scan.ok.tolist() == [True, False, False, False, False, False]
    assert decode_record(long_varint)[1] == packet
    assert not _scanned([odd_key]).ok.any()
    assert decode_record(out_of_order)[1] == packet  # all valid protobuf, decoded elsewhere


@pytest.mark.parametrize("chunk", [64, 300, 1 << 20])
@pytest.mark.parametrize("max_records", [1, 3, 1000])
@pytest.mark.parametrize(
    "damage",
    [
        None,
        lambda d, at: _flip(d, at + 1),
        lambda d, at: _flip(d, at + 9),
        lambda d, at: _flip(d, at + 20),
        lambda d, at: _flip(d, at + 400),  # the next record's header or data
        lambda d, at: d[: at + 30],
        lambda d, at: d[: at + 5],
        lambda d, at: d + b"\x01",
    ],
)
def test_runs_hand_on_what_iter_framed_reads(tmp_path, monkeypatch, chunk, max_records, damage):
    """The backfill reads with positions.iter_runs: the same records as iter_framed, cut into
    runs by the batch rule, then the same error at the same byte."""
    monkeypatch.setattr(positions, "CHUNK_BYTES", chunk)
    records = [
        make_record(node_key(1), packet_id=bytes([i]) * 16, metrics={"m": 1.0} if i % 2 else {})
        for i in range(9)
    ]
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    data = path.read_bytes()
    if damage is not None:
        data = damage(data, 3 * (len(records[0]) + FRAMING) + 3 * 4)
        path.write_bytes(data)

    def read(reader):
        out, error = [], None
        with open_log(str(path)) as handle:
            try:
                for item in reader(handle):
                    out.append(item)
            except CorruptRecordFile as e:
                error = (e.offset, str(e), e.rest)
        return out, error

    framed, framed_error = read(iter_framed)
    runs, runs_error = read(lambda h: positions.iter_runs(h, max_records, 1 << 20))
    assert runs_error == framed_error
    got = []
    for start, run, at, lengths in runs:
        assert len(at) <= max_records and data[start : start + len(run)] == run
        got += [(start + a, run[a + 12 : a + 12 + n]) for a, n in zip(at, lengths, strict=True)]
    assert got == framed
    full = [len(at) for _, _, at, _ in runs[:-1]]
    assert all(n == max_records for n in full) or framed_error is not None


def test_runs_end_at_the_byte_limit(tmp_path):
    records = [make_record(node_key(1), packet_id=bytes([i]) * 16) for i in range(6)]
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    size = len(records[0])
    with open_log(str(path)) as handle:
        runs = list(positions.iter_runs(handle, 100, 2 * (size + FRAMING) + size))
    assert [len(at) for _, _, at, _ in runs] == [3, 3]  # the third record's data reaches it


def test_a_scanned_range_reads_back_as_the_run_the_scan_saw(tmp_path):
    """The backfill scans a shard into range descriptors, spreads them and reads each range
    where it is validated: the bytes and record positions are those of the scan; a log cut
    after the scan is an error naming it, not a short batch."""
    from qis_beam.transforms.read import LogChangedWhileRead, _ScanShardFn, read_batch

    records = [make_record(node_key(1), packet_id=bytes([i]) * 16) for i in range(7)]
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    with open_log(str(path)) as handle:
        runs = list(positions.iter_runs(handle, 3, 1 << 20))
    descriptors = list(_ScanShardFn(3).process((str(path), path.stat().st_size)))
    assert len(descriptors) == len(runs) == 3
    for (start, data, at, lengths), descriptor in zip(runs, descriptors, strict=True):
        got = read_batch(descriptor)
        assert got[:3] == (str(path), start, data)
        assert got[3].tolist() == at.tolist() and got[4].tolist() == lengths.tolist()
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(LogChangedWhileRead, match="log.tfrecord"):
        read_batch(descriptors[-1])


def test_scanned_columns_fold_as_parsed_payloads():
    """The second pass folds scanned columns; a record the scan cannot read is parsed."""
    key = node_key(1)
    records = [
        make_record(
            key, packet_id=bytes([i]) * 16, approach_id=f"a{i % 3}", event_time_ms=T0_MS + i
        )
        for i in range(40)
    ] + [make_record(key, metrics={"é": 1.0})]  # not read by the scan
    scan = _scanned(records)
    assert scan.ok.tolist() == [True] * 40 + [False]
    by_scan, by_parse = PacketColumns(HOUR_MS), PacketColumns(HOUR_MS)
    by_scan.add_scanned(scan, lambda i: payload_of(records[i]))
    by_parse.add_payloads([payload_of(r) for r in records])
    (w1, a1), (w2, a2) = by_scan.fold(), by_parse.fold()
    assert {k: s.to_bytes() for k, s in w1.items()} == {k: s.to_bytes() for k, s in w2.items()}
    assert {k: s.to_bytes() for k, s in a1.items()} == {k: s.to_bytes() for k, s in a2.items()}


@pytest.mark.parametrize("damage_at", [None, 20, 6000])
def test_runs_of_records_larger_than_a_chunk(tmp_path, monkeypatch, damage_at):
    monkeypatch.setattr(positions, "CHUNK_BYTES", 1000)
    records = [
        make_record(node_key(1), packet_id=bytes([i]) * 16, context_embedding=[0.5] * 1500 * i)
        for i in range(4)
    ]  # 0.2, 6, 12 and 18 KB: lengths past the table of length checksums, reads past a chunk
    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    if damage_at is not None:
        path.write_bytes(_flip(path.read_bytes(), len(records[0]) + FRAMING + damage_at))

    def read(reader):
        out, error = [], None
        with open_log(str(path)) as handle:
            try:
                out.extend(reader(handle))
            except CorruptRecordFile as e:
                error = (e.offset, str(e), e.rest)
        return out, error

    def from_runs(handle):
        for start, run, at, lengths in positions.iter_runs(handle, 2, 1 << 20):
            yield from (
                (start + a, run[a + 12 : a + 12 + n]) for a, n in zip(at, lengths, strict=True)
            )

    framed = read(iter_framed)
    assert read(from_runs) == framed
    assert len(framed[0]) == (4 if damage_at is None else 1)
