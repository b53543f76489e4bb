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

import numpy as np
from apache_beam.io.filesystems import FileSystems

from qis_beam.tfrecords import CorruptRecordFile, _masked_crc32c
from qis_beam.wire import MAX_CORRUPT_TAIL_BYTES

_HEADER = struct.Struct("<QI")
_FOOTER = 4
_CRC = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
HEADER_BYTES = _HEADER.size  # length and its checksum, before each record
FRAMING = HEADER_BYTES + _FOOTER  # bytes around each record
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


# A run of consecutive whole records of a log: (file offset of its first record's header, its
# bytes, framing included, the offset of each record's header in them, each record's length).
Run = tuple[int, bytes, np.ndarray, np.ndarray]


def iter_runs(handle: BinaryIO, max_records: int, max_bytes: int) -> Iterator[Run]:
    """The records of a whole log as runs, checksums verified, cut where
    :func:`qis_beam.transforms.read` always cut its batches: after ``max_records`` records,
    or after the record whose data ends ``max_bytes`` or more past the run's start.

    Like :func:`iter_framed`, only faster (the checksums of a chunk are compared at once):
    every record before a break in the framing is handed on, then its
    :class:`CorruptRecordFile` is raised, decided by :func:`iter_framed` itself.
    """
    buf, base, framed, eof = b"", 0, 0, False  # base: file offset of buf[0]; framed: end
    offsets: list[int] = []  # of the records of the pending run, relative to buf[0]
    lengths: list[int] = []
    need = HEADER_BYTES
    while True:
        if not eof and len(buf) - framed < max(need, CHUNK_BYTES):
            chunk = handle.read(max(need, CHUNK_BYTES))
            eof = not chunk
            buf += chunk
        more_offsets, more_lengths, stop = _frame(buf, framed)
        bad = _first_bad(buf, more_offsets, more_lengths)
        offsets += more_offsets[:bad]
        lengths += more_lengths[:bad]
        framed = stop if bad == len(more_offsets) else more_offsets[bad]
        while offsets:  # hand on every full run
            cut = _cut(offsets, lengths, max_records, max_bytes)
            if cut is None:
                break
            end = offsets[cut - 1] + FRAMING + lengths[cut - 1]
            yield _run(base, buf, offsets[:cut], lengths[:cut], end)
            buf, base, framed = buf[end:], base + end, framed - end
            offsets = [o - end for o in offsets[cut:]]
            lengths = lengths[cut:]
        broken = bad < len(more_offsets) or (eof and framed < len(buf))
        if broken or (framed + HEADER_BYTES <= len(buf) and _bad_header(buf, framed)):
            broken = True
        if broken or eof:
            if offsets:
                end = offsets[-1] + FRAMING + lengths[-1]
                yield _run(base, buf, offsets, lengths, end)
            if broken:  # iter_framed raises the exact error (and hands on any record first)
                yield from _framed_runs(handle, base + framed)
            return
        need = HEADER_BYTES if framed + HEADER_BYTES > len(buf) else (
            FRAMING + _HEADER.unpack_from(buf, framed)[0]
        )  # fmt: skip


def _frame(buf: bytes, pos: int) -> tuple[list[int], list[int], int]:
    """Offsets and lengths of the whole records from ``pos``, and where they stop."""
    offsets: list[int] = []
    lengths: list[int] = []
    end, unpack = len(buf), _LENGTH.unpack_from
    while pos + HEADER_BYTES <= end:
        (length,) = unpack(buf, pos)
        stop = pos + FRAMING + length
        if stop > end:
            break
        offsets.append(pos)
        lengths.append(length)
        pos = stop
    return offsets, lengths, pos


def _bad_header(buf: bytes, pos: int) -> bool:
    length_crc = _HEADER.unpack_from(buf, pos)[1]
    return _masked_crc32c(buf[pos : pos + 8]) != length_crc


def _first_bad(buf: bytes, offsets: list[int], lengths: list[int]) -> int:
    """Index of the first record whose length or data checksum is wrong (or len(offsets))."""
    if not offsets:
        return 0
    at = np.array(offsets, dtype=np.int64)
    size = np.array(lengths, dtype=np.int64)
    u32 = np.ndarray((len(buf) - 3,), dtype="V4", buffer=buf, strides=(1,))
    if size.max() < len(_LENGTH_CRCS):
        expected = _LENGTH_CRCS[size]
    else:
        distinct, which = np.unique(size, return_inverse=True)
        crcs = [_masked_crc32c(_LENGTH.pack(n)) for n in distinct.tolist()]
        expected = np.array(crcs, dtype=np.uint32)[which.reshape(-1)]
    good = u32[at + 8].view("<u4") == expected
    data = (at + HEADER_BYTES).tolist()
    stops = (at + HEADER_BYTES + size).tolist()
    good &= u32[at + HEADER_BYTES + size].view("<u4") == _data_crcs(buf, data, stops)
    return int(np.argmin(good)) if not good.all() else len(offsets)


def _data_crcs(buf: bytes, starts: list[int], stops: list[int]) -> np.ndarray:
    """Masked CRC-32C of each record (TFRecord's footer)."""
    if _CRC32C is None:
        return np.array(
            [_masked_crc32c(buf[a:b]) for a, b in zip(starts, stops, strict=True)], np.uint32
        )
    crc = np.array([_CRC32C(buf[a:b]) for a, b in zip(starts, stops, strict=True)], dtype=np.uint64)
    return ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF).astype(np.uint32)


def _raw_crc32c():
    """The CRC-32C function under Beam's masked one, if it is google_crc32c's (checked)."""
    try:
        from google_crc32c import value
    except ImportError:  # pragma: no cover - Beam's [gcp] extra brings it
        return None
    probe = b"qis-beam TFRecord"
    crc = value(probe)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return value if masked == _masked_crc32c(probe) else None


_CRC32C = _raw_crc32c()
# The length checksum of every record length below 4 KiB (records are well under that).
_LENGTH_CRCS = np.array([_masked_crc32c(_LENGTH.pack(n)) for n in range(4096)], np.uint32)


def _cut(offsets: list[int], lengths: list[int], max_records: int, max_bytes: int) -> int | None:
    """Records in the first full run of the pending ones, or None if they make none yet."""
    limit = min(len(offsets), max_records)
    for i in range(limit):  # the byte limit: rarely before max_records
        if offsets[i] + lengths[i] >= max_bytes:  # the run starts at offset 0
            return i + 1
        if i == 0 and offsets[limit - 1] + lengths[limit - 1] < max_bytes:
            break  # none before it reaches it either: offsets[i] + lengths[i] ascends
    return limit if len(offsets) >= max_records else None


def _run(base: int, buf: bytes, offsets: list[int], lengths: list[int], end: int) -> Run:
    start = offsets[0]
    at = np.array(offsets, dtype=np.int64) - start
    return base + start, buf[start:end], at, np.array(lengths, dtype=np.int64)


def _framed_runs(handle: BinaryIO, start: int) -> Iterator[Run]:
    """:func:`iter_framed` from ``start``: a record at a time, then its error."""
    handle.seek(start)
    for offset, record in iter_framed(handle, start):
        head = _LENGTH.pack(len(record))
        framed = _HEADER.pack(len(record), _masked_crc32c(head)) + record
        framed += _CRC.pack(_masked_crc32c(record))
        yield offset, framed, np.zeros(1, np.int64), np.array([len(record)], np.int64)


def read_range(path: str, start: int, end: int) -> bytes:
    """The bytes ``[start, end)`` of a log."""
    parts = []
    with open_log(path) as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            chunk = handle.read(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
    return b"".join(parts)


def frame_range(data: bytes) -> tuple[list[int], list[int]]:
    """``(offsets, lengths)`` of the records of ``data``, whole records already verified by
    the first pass (no checksums); :class:`CorruptRecordFile` if the framing does not fit."""
    offsets: list[int] = []
    lengths: list[int] = []
    pos, end, unpack = 0, len(data), _LENGTH.unpack_from
    while pos < end:
        if pos + FRAMING > end:
            raise _corrupt(pos, "truncated length header", data[pos:])
        (length,) = unpack(data, pos)
        if pos + FRAMING + length > end:
            raise _corrupt(pos, "truncated record", data[pos:])
        offsets.append(pos)
        lengths.append(length)
        pos += FRAMING + length
    return offsets, lengths


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
