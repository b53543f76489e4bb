"""The stable 64-bit hashes synthesis is keyed by: node ids (distinct counting) and approach
ids (which approaches an address tracks). Never Python's salted ``hash``."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np


def node_hash(node_id: bytes) -> int:
    """uint64 of ``node_id[:8]`` big-endian; node ids are SHA-256 prefixes, hence uniform."""
    return int.from_bytes(node_id[:8], "big")


def node_hash_array(node_ids: Sequence[bytes]) -> np.ndarray:
    """Vectorised :func:`node_hash` (uint64 array)."""
    n = len(node_ids)
    if n and min(map(len, node_ids)) >= 8:
        # "S8" keeps exactly the first 8 bytes of each id: no per-id Python work.
        return np.array(node_ids, dtype="S8").view(">u8").astype(np.uint64)
    return np.fromiter((node_hash(x) for x in node_ids), dtype=np.uint64, count=n)


@functools.lru_cache(maxsize=1 << 16)
def approach_hash(approach_id: str) -> int:
    """blake2b-64 of the id: the smallest ``(approach_hash, approach_id)`` are tracked."""
    return int.from_bytes(hashlib.blake2b(approach_id.encode(), digest_size=8).digest(), "big")
