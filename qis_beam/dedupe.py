"""The batch duplicate rule of spec section 4, Beam-free.

Copies sharing a packet_id: the lexicographically smallest payload is the packet; other
copies with that same payload are duplicates; copies with any other payload are
conflicting duplicates (dead letters). The verdict depends only on the set of copies,
never on their order, so every runner and every sharding agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

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
