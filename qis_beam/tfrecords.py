"""TFRecord framing shared by the emitter, the simulator and the batched reader.

The framing and its masked CRC-32C are Beam's own (``apache_beam.io.tfrecordio``), so
files written here are read by ``ReadFromTFRecord`` and by TensorFlow alike. The batched
reader exists because per-record reading costs ~8 µs of Beam overhead per element: the
backfill reads whole shards and hands records on in lists (beam-facts.md, "Speed").
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from apache_beam.io.filesystems import FileSystems

from qis_beam.beam_internals import tfrecord_util

_masked_crc32c = tfrecord_util()._masked_crc32c
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class CorruptRecordFile(Exception):
    """The framing of a TFRecord file is broken at ``offset``; the rest cannot be read."""

    def __init__(self, offset: int, reason: str, rest: bytes):
        super().__init__(f"corrupt TFRecord framing at byte {offset}: {reason}")
        self.offset = offset
        self.rest = rest


def write_record(handle: BinaryIO, record: bytes) -> None:
    tfrecord_util().write_record(handle, record)


def iter_records(data: bytes) -> Iterator[bytes]:
    """Records of a whole TFRecord file held in memory; raises CorruptRecordFile on bad framing."""
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _HEADER.size:
            raise CorruptRecordFile(offset, "truncated length header", bytes(view[offset:]))
        length, length_crc = _HEADER.unpack_from(view, offset)
        if _masked_crc32c(bytes(view[offset : offset + 8])) != length_crc:
            raise CorruptRecordFile(offset, "length checksum mismatch", bytes(view[offset:]))
        start = offset + _HEADER.size
        stop = start + length
        if stop + _FOOTER.size > end:
            raise CorruptRecordFile(offset, "truncated record", bytes(view[offset:]))
        record = bytes(view[start:stop])
        (data_crc,) = _FOOTER.unpack_from(view, stop)
        if _masked_crc32c(record) != data_crc:
            raise CorruptRecordFile(offset, "data checksum mismatch", bytes(view[offset:]))
        yield record
        offset = stop + _FOOTER.size


def read_file(path: str) -> bytes:
    """Whole file, local or any Beam filesystem (gs://, ...)."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def split_records(data: bytes) -> tuple[list[bytes], CorruptRecordFile | None]:
    """Every record that frames, and the framing error that stopped the file, if any."""
    records: list[bytes] = []
    try:
        for record in iter_records(data):
            records.append(record)
    except CorruptRecordFile as error:
        return records, error
    return records, None
