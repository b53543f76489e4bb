"""Signing, key files, the registry and the emitter's TFRecord logs."""

from __future__ import annotations

import os
import stat

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from conftest import fnapi_options, node_key

from qis_beam.emitter import OutcomeEmitter, OutcomeType
from qis_beam.signing import NodeKey, load_registry, node_id_for, verify
from qis_beam.tfrecords import CorruptRecordFile, iter_records
from qis_beam.validation import Accepted, ValidationPolicy, validate
from qis_beam.wire import Envelope


def test_sign_and_verify():
    key = node_key(1)
    signature = key.sign(b"payload")
    assert len(signature) == 64 and len(key.public_key) == 32
    assert verify(key.public_key, signature, b"payload")
    assert not verify(key.public_key, signature, b"payloaD")
    assert not verify(node_key(2).public_key, signature, b"payload")
    assert not verify(b"short", signature, b"payload")
    assert key.node_id == node_id_for(key.public_key) and len(key.node_id) == 16


def test_key_file_round_trip_is_private(tmp_path):
    path = tmp_path / "keys" / "node.key"
    created = NodeKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert NodeKey.load_or_create(path).public_key == created.public_key


def test_registry_parsing(tmp_path):
    a, b = node_key(1), node_key(2)
    path = tmp_path / "nodes.txt"
    path.write_text(f"# swarm\n\n{a.public_key.hex()}\n  {b.public_key.hex()}  # node b\n")
    assert load_registry(path) == {a.public_key, b.public_key}
    path.write_text("abcd\n")
    with pytest.raises(ValueError, match="32 bytes"):
        load_registry(path)
    path.write_text("zz\n")
    with pytest.raises(ValueError, match="not hex"):
        load_registry(path)


@pytest.mark.slow
def test_emitter_writes_valid_signed_packets_beam_can_read(tmp_path):
    log = tmp_path / "packets-node1.tfrecord"
    context = {"task": "causal-lm", "params": 1e9}
    with OutcomeEmitter.open(
        key_file=tmp_path / "node.key", log_path=log, template_id="llm-finetune/v1", context=context
    ) as emitter:
        written = [
            emitter.emit(
                approach_id=f"optimizer=adamw{i}",
                outcome_type=OutcomeType.PARTIAL,
                outcome_delta=0.01 * i,
                confidence=0.5,
                metrics={"loss": 1.0},
            )
            for i in range(3)
        ]
    records = list(iter_records(log.read_bytes()))
    assert records == written
    for record in records:
        verdict = validate(record, ValidationPolicy())
        assert isinstance(verdict, Accepted)
        assert verdict.packet.semantic_address == emitter.address
    with beam.Pipeline(options=fnapi_options()) as p:
        read = p | beam.io.ReadFromTFRecord(str(log))
        assert_that(read, equal_to(written))


def test_corrupt_framing_is_reported(tmp_path):
    key = node_key(1)
    payload = Envelope(payload=b"x", public_key=key.public_key).SerializeToString()
    from qis_beam.tfrecords import write_record

    path = tmp_path / "log.tfrecord"
    with open(path, "wb") as f:
        write_record(f, payload)
        write_record(f, payload)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    reader = iter_records(bytes(data))
    assert next(reader) == payload
    with pytest.raises(CorruptRecordFile, match="data checksum"):
        next(reader)
