"""Source positions in TFRecord logs: read in chunks with byte offsets, re-read a range,
fetch one record at an offset. No Beam here.

The batch backfill reads every log twice instead of holding packets in a shuffle: the first
pass validates and sends only compact ``(packet_id, digest, position)`` entries to the dedupe
shuffle; the second re-reads each range and folds the packets the dedupe kept. A record's
position is the byte offset of its TFRecord header in its file; a conflicting copy's raw bytes
(for its dead letter) are fetched from there. Works on any Beam filesystem (local, gs://).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from apache_beam.io.filesystems import FileSystems

from qis_beam.tfrecords import CorruptRecordFile, _masked_crc32c
from qis_beam.wire import MAX_CORRUPT_TAIL_BYTES

_HEADER = struct.Struct("<QI")
_FOOTER = 4
_CRC = struct.Struct("<I")
FRAMING = _HEADER.size + _FOOTER  # bytes around each record
CHUNK_BYTES = 4 << 20  # file reads of this size: memory is bounded whatever the shard size


def open_log(path: str) -> BinaryIO:
    return FileSystems.open(path, compression_type="uncompressed")


def iter_framed(
    handle: BinaryIO, start: int = 0, end: int | None = None, check_crc: bool = True
) -> Iterator[tuple[int, bytes]]:
    """``(offset, record)`` of each record from ``start`` (a record boundary) to ``end`` (or EOF).

    Reads ``CHUNK_BYTES`` at a time. Raises :class:`CorruptRecordFile` (carrying at most
    ``MAX_CORRUPT_TAIL_BYTES`` of the rest) on broken framing; ``check_crc=False`` skips the
    checksums of a range the first pass already verified.
    """
    if start:
        handle.seek(start)
    buf, base, pos, eof = b"", start, 0, False  # base: file offset of buf[0]

    def fill(need: int) -> bool:
        nonlocal buf, base, pos, eof
        while len(buf) - pos < need and not eof:
            size = max(CHUNK_BYTES, need)
            if end is not None:
                size = min(size, end - base - len(buf))
            chunk = handle.read(size) if size > 0 else b""
            if not chunk:
                eof = True
                break
            buf, base, pos = buf[pos:] + chunk, base + pos, 0
        return len(buf) - pos >= need

    header, framing = _HEADER.size, FRAMING
    # Records of a log have few distinct lengths: a verified length header is remembered
    # (its 12 bytes, length and checksum) instead of checksummed again (~0.5 us a record).
    good_headers: set[bytes] = set()
    while True:
        if pos + header > len(buf) and not fill(header):
            if len(buf) == pos:
                return
            fill(MAX_CORRUPT_TAIL_BYTES)
            raise _corrupt(base + pos, "truncated length header", buf[pos:])
        length, length_crc = _HEADER.unpack_from(buf, pos)
        if check_crc and (head := buf[pos : pos + header]) not in good_headers:
            if _masked_crc32c(head[:8]) != length_crc:
                fill(MAX_CORRUPT_TAIL_BYTES)
                raise _corrupt(base + pos, "length checksum mismatch", buf[pos:])
            if len(good_headers) < 4096:
                good_headers.add(head)
        if pos + framing + length > len(buf) and not fill(framing + length):
            fill(MAX_CORRUPT_TAIL_BYTES)
            raise _corrupt(base + pos, "truncated record", buf[pos:])
        stop = pos + _HEADER.size + length
        record = buf[pos + _HEADER.size : stop]
        if check_crc and _masked_crc32c(record) != _CRC.unpack_from(buf, stop)[0]:
            fill(MAX_CORRUPT_TAIL_BYTES)
            raise _corrupt(base + pos, "data checksum mismatch", buf[pos:])
        yield base + pos, record
        pos = stop + _FOOTER


def _corrupt(offset: int, reason: str, rest: bytes) -> CorruptRecordFile:
    return CorruptRecordFile(offset, reason, rest[:MAX_CORRUPT_TAIL_BYTES])


def record_at(handle: BinaryIO, offset: int) -> bytes:
    """The record whose header is at ``offset`` (framing already verified by the first pass)."""
    handle.seek(offset)
    (length,) = struct.unpack("<Q", handle.read(8))
    handle.seek(offset + _HEADER.size)
    return handle.read(length)


def fetch_records(positions: list[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """Raw records at ``(path, offset)`` positions, one open per file."""
    by_path: dict[str, list[int]] = {}
    for path, offset in positions:
        by_path.setdefault(path, []).append(offset)
    out = {}
    for path, offsets in by_path.items():
        with open_log(path) as handle:
            for offset in sorted(set(offsets)):
                out[(path, offset)] = record_at(handle, offset)
    return out


# No key of the backfill's per-packet shuffles holds more than a small share of the packets,
# whatever the input size, so the work spreads over as many workers as there are; a key's
# work is also bounded (by ``cap`` here, by qis_beam.dedupe.shards_for for dedupe shards).
RANGE_SHARE = 1 / 256  # ranges (units of re-reading and folding): well under 1% of the input
ASSUMED_RECORD_BYTES = 200  # for sizing only: smaller than typical records (~240-300 bytes)
MIN_RANGE_RECORDS = 256


def estimated_records(total_bytes: int) -> int:
    return max(1, total_bytes // ASSUMED_RECORD_BYTES)


def range_records_for(records: int, cap: int) -> int:
    """Records per range: about ``RANGE_SHARE`` of the input, at least 256 (a range is also a
    unit of reading), at most ``cap``."""
    return max(1, min(cap, max(MIN_RANGE_RECORDS, int(records * RANGE_SHARE))))
