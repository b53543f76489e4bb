"""The batch duplicate rule of spec section 4, Beam-free.

Copies sharing a packet_id: the lexicographically smallest payload is the packet; other
copies with that same payload are duplicates; copies with any other payload are
conflicting duplicates (dead letters). The verdict depends only on the set of copies,
never on their order, so every runner and every sharding agree.

:func:`dedupe` applies the rule to whole copies (the reference, and small inputs);
:func:`decide` applies it to the compact entries the backfill shuffles.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

Copy = tuple[bytes, bytes, str]  # (packet_id, record, source)


@dataclasses.dataclass
class DedupeResult:
    kept: dict[bytes, bytes]  # packet_id -> record of the kept copy
    duplicates: int
    conflicts: list[Copy]


def dedupe(copies: Iterable[Copy], payload_of: Callable[[bytes], bytes]) -> DedupeResult:
    """Apply the batch rule; ``payload_of`` extracts the signed payload from a record."""
    first: dict[bytes, bytes] = {}
    first_source: dict[bytes, str] = {}
    repeats: dict[bytes, list[tuple[bytes, str]]] = {}
    for packet_id, record, source in copies:
        if packet_id in first:
            repeats.setdefault(packet_id, []).append((record, source))
        else:
            first[packet_id] = record
            first_source[packet_id] = source
    duplicates = 0
    conflicts: list[Copy] = []
    # Only packet_ids seen more than once need their payloads compared.
    for packet_id, others in repeats.items():
        group = [(first[packet_id], first_source[packet_id]), *others]
        payloads = [payload_of(record) for record, _ in group]
        smallest = min(payloads)
        kept = None
        for payload, (record, source) in zip(payloads, group, strict=True):
            if payload != smallest:
                conflicts.append((packet_id, record, source))
            elif kept is None:
                kept = record
            else:
                duplicates += 1
        first[packet_id] = kept
    return DedupeResult(first, duplicates, conflicts)


# --------------------------------------------------------------------------------------------
# The same rule over compact entries, as the backfill applies it: the dedupe shuffle carries
# only (packet_id prefix, digest of payload, source position) per copy, 24 bytes, never the
# records (the runner may hold several copies of the shuffle at once: it is what grows with
# the input).

Position = tuple[str, int]  # (source file, byte offset of the record)

# One copy: the first 8 bytes of its packet_id (read big-endian), a keyed 64-bit digest of
# its payload, its offset relative to its range's start, and its range's index in the slice's
# table of ranges. Little-endian throughout: numpy keeps that byte order through
# concatenation, so the bytes on the wire are always this layout. Copies are grouped by the
# prefix; different packet_ids sharing one are told apart exactly by :func:`decide`.
ENTRY = np.dtype([("id", "<u8"), ("digest", "<u8"), ("rel", "<u4"), ("range", "<u4")])


def packet_id_prefixes(packet_ids: list[bytes]) -> np.ndarray:
    """uint64 of the first 8 bytes (big-endian) of each 16-byte packet id."""
    return np.frombuffer(b"".join(packet_ids), dtype=">u8")[::2].astype(np.uint64)


def payload_digest(payload: bytes, key: bytes) -> bytes:
    """8 bytes standing for the payload in the shuffle. Keyed (one random key per pipeline), so
    nobody can craft two payloads that collide; equal payloads always have equal digests."""
    return hashlib.blake2b(payload, digest_size=8, key=key).digest()


def payload_digests(payloads: Iterable[bytes], key: bytes) -> bytes:
    """:func:`payload_digest` of each payload, concatenated (8 bytes each); copying one keyed
    hasher is ~20% cheaper than keying a new one per payload."""
    keyed = hashlib.blake2b(digest_size=8, key=key)
    out = bytearray()
    for payload in payloads:
        h = keyed.copy()
        h.update(payload)
        out += h.digest()
    return bytes(out)


def shard_of(entries: np.ndarray, shards: int) -> np.ndarray:
    """Dedupe shard of each entry from its packet_id prefix: Fibonacci hashing, so even
    sequential ids spread evenly. ``shards`` is a power of two."""
    if shards == 1:
        return np.zeros(len(entries), dtype=np.int64)
    mixed = entries["id"] * np.uint64(0x9E3779B97F4A7C15)
    return (mixed >> np.uint64(64 - shards.bit_length() + 1)).astype(np.int64)


def repeated_runs(entries: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the entries sharing a packet_id prefix, for every prefix seen more than
    once."""
    if len(entries) < 2:
        return []
    order = np.argsort(entries["id"], kind="stable")
    ids = entries["id"][order]
    same = ids[1:] == ids[:-1]
    if not same.any():
        return []
    # Runs of equal ids: starts where an id differs from its predecessor.
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    lengths = np.diff(np.concatenate((starts, [len(order)])))
    return [
        order[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist(), strict=True) if n > 1
    ]


@dataclasses.dataclass
class Verdict:
    duplicates: list[Position]
    # (position, raw record, packet_id) of each conflicting copy
    conflicts: list[tuple[Position, bytes, bytes]]


def decide(
    copies: Sequence[tuple[int, Position]],
    fetch: Callable[[list[Position]], dict[Position, bytes]],
    payload_of: Callable[[bytes], bytes],
    packet_id_of: Callable[[bytes], bytes],
) -> Verdict:
    """The batch rule for the ``(digest, position)`` copies sharing one packet_id prefix.

    Equal digests mean equal payloads (hence one packet_id): the copy at the smallest
    position is kept, the others are duplicates, nothing is read. Otherwise the raw records
    are fetched from their positions, grouped by their real packet_id (``packet_id_of`` a
    payload), and the rule is applied to each group's payloads (smallest payload kept; copies
    equal to it are duplicates, the others conflicts), so the verdict is exact.
    """
    positions = sorted(position for _, position in copies)
    if len({digest for digest, _ in copies}) == 1:
        return Verdict(positions[1:], [])
    records = fetch(positions)
    payloads = {position: payload_of(records[position]) for position in positions}
    by_id: dict[bytes, list[Position]] = {}
    for p in positions:
        by_id.setdefault(packet_id_of(payloads[p]), []).append(p)
    verdict = Verdict([], [])
    for packet_id, same in by_id.items():
        smallest = min(payloads[p] for p in same)
        winners = [p for p in same if payloads[p] == smallest]
        verdict.duplicates.extend(winners[1:])
        verdict.conflicts.extend(
            (p, records[p], packet_id) for p in same if payloads[p] != smallest
        )
    return verdict


# Each validation flush is cut into one slice per shard, so a backfill shuffles about
# (records / flush) x shards slices: with 2048 entries a shard, a 12M-record input made 8192
# shards, 375k shuffled slices of ~30 entries, and 46 bytes shuffled per 24-byte entry.
# 16k entries (~400 KB) is still little work per key.
TARGET_ENTRIES_PER_SHARD = 16384
MIN_SHARDS = 512  # no shard holds much more than 1/512 of the packets, whatever the size
MAX_SHARDS = 1 << 20


def shards_for(records: int, minimum: int = 1) -> int:
    """Dedupe shards: a power of two, so that a shard holds about 16k entries (bounded work
    per key, thousands of keys on big inputs) and never much more than 1/512 of all packets;
    at least ``minimum`` (``--dedupe-shards``), at most 2**20."""
    wanted = max(minimum, -(-records // TARGET_ENTRIES_PER_SHARD), MIN_SHARDS)
    return min(MAX_SHARDS, 1 << (wanted - 1).bit_length())


PART_ENTRIES = 1_000_000
MAX_PARTS = 16


def parts_for(records: int) -> int:
    """Independent shuffles the dedupe's shards are split over: one per ~1M entries, at most
    16. A local runner (the FnApiRunner) hands each shuffle's whole input to its worker as
    one buffer, copied about five times on the way (~120 bytes a packet for an unsplit
    shuffle, the one part of a backfill's memory that grows with its input); elsewhere parts
    are simply smaller shuffles of the same keys."""
    return max(1, min(MAX_PARTS, -(-records // PART_ENTRIES)))
