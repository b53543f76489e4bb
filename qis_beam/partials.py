"""Parsed packets -> partial syntheses per (address, event-time bucket). No Beam here.

A bucket is the pre-aggregation grain of the pipeline: the window size for fixed windows,
the period for sliding ones, so every packet of a bucket falls in exactly the same windows
and a bucket's partial can be windowed by its start time. The batch path folds whole
lists of payloads here (numpy, see :func:`qis_beam.synthesis.synthesize_columns`); the
streaming path folds one packet at a time with :func:`add_packet`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qis_beam.synthesis import Synthesis, node_hash_array, synthesize_columns
from qis_beam.synthesis.columnar import dense_codes
from qis_beam.synthesis.sketch import sorted_unique
from qis_beam.wire import (
    ADDRESS_AT,
    ADDRESS_BYTES,
    NODE_ID_AT,
    OutcomePacket,
    ScannedRecords,
    iter_packets,
)


def add_packet(synthesis: Synthesis, p: OutcomePacket) -> None:
    """Fold one validated packet into ``synthesis`` (the streaming paths, packet by packet)."""
    synthesis.add(
        p.node_id,
        p.approach_id,
        p.outcome_type,
        p.outcome_delta,
        p.confidence,
        p.event_time_ms,
        p.template_id,
    )


# Column dtypes of PacketColumns' chunks (node ids are kept as their 64-bit hash).
_COLUMNS = (
    ("address", np.int64),
    ("node", np.uint64),
    ("approach", np.int64),
    ("template", np.int64),
    ("outcome", np.int64),
    ("delta", np.float64),
    ("confidence", np.float64),
    ("event_time", np.int64),
)


class PacketColumns:
    """Fields of many packets, column by column, folded at once by :meth:`fold`.

    The batch backfill's second pass appends the kept packets of every range of a bundle and
    folds about a million at a time: partials per (address, bucket) and per address are then
    few and large, which keeps the merges after the shuffle cheap. Each call's packets are
    stored as numpy chunks (~50 bytes a packet), not Python objects.
    """

    def __init__(self, bucket_ms: int):
        self._bucket_ms = bucket_ms
        self._reset()

    def _reset(self) -> None:
        self._codes: tuple[dict, dict, dict] = ({}, {}, {})  # address, approach, template
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add_payloads(self, payloads) -> None:
        addresses, approaches, templates = self._codes
        cols: tuple[list, ...] = tuple([] for _ in _COLUMNS)
        address, node_id, approach, template, outcome, delta, confidence, event_time = (
            c.append for c in cols
        )
        for p in iter_packets(payloads):
            a = p.semantic_address
            code = addresses.get(a)
            address(code if code is not None else addresses.setdefault(a, len(addresses)))
            a = p.approach_id
            code = approaches.get(a)
            approach(code if code is not None else approaches.setdefault(a, len(approaches)))
            a = p.template_id
            code = templates.get(a)
            template(code if code is not None else templates.setdefault(a, len(templates)))
            node_id(p.node_id)
            outcome(p.outcome_type)
            delta(p.outcome_delta)
            confidence(p.confidence)
            event_time(p.event_time_ms)
        if cols[0]:
            chunk = tuple(
                node_hash_array(c) if name == "node" else np.array(c, dtype=dtype)
                for (name, dtype), c in zip(_COLUMNS, cols, strict=True)
            )
            self._chunks.append(chunk)
            self._count += len(cols[0])

    def add_scanned(self, scan: ScannedRecords, payload_of_row: Callable[[int], bytes]) -> None:
        """The packets of scanned records, in order (:func:`qis_beam.wire.scan_records`);
        ``payload_of_row(i)`` gives the payload of a row the scan could not read."""
        n = len(scan.ok)
        if not n:
            return
        slow = np.flatnonzero(~scan.ok)
        p0 = scan.payload_start
        addresses, approaches, templates = self._codes
        chunk = (
            _codes(scan, p0 + ADDRESS_AT, ADDRESS_BYTES, addresses, bytes),
            scan.u64[p0 + NODE_ID_AT].byteswap(),  # node_hash: the first 8 bytes, big-endian
            _codes(scan, *scan.approach_id, approaches, bytes.decode),
            _codes(scan, *scan.template_id, templates, bytes.decode),
            scan.outcome_type,
            scan.outcome_delta,
            scan.confidence,
            scan.event_time_ms,
        )
        if len(slow):  # rows laid out otherwise: the per-record parse, into the same columns
            parsed = PacketColumns(self._bucket_ms)
            parsed._codes = self._codes
            parsed.add_payloads([payload_of_row(i) for i in slow.tolist()])
            for column, values in zip(chunk, parsed._chunks[0], strict=True):
                column[slow] = values
        self._chunks.append(chunk)
        self._count += n

    def fold(self) -> tuple[dict[tuple[str, int], Synthesis], dict[str, Synthesis]]:
        """``({(address_hex, bucket_start_ms): partial}, {address_hex: partial})``; empties."""
        if not self._count:
            return {}, {}
        addresses, approaches, templates = (list(codes) for codes in self._codes)
        chunks = self._chunks
        address, nodes, approach, template, outcome, delta, confidence, times = (
            np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(_COLUMNS))
        )
        self._reset()
        uh = sorted_unique(nodes)  # coded once for both folds
        columns = dict(
            template_ids="",  # set per group below: cheaper than a string per packet
            node_hashes=(uh, np.searchsorted(uh, nodes)),
            approach_ids=(approach, approaches),
            outcome_types=outcome,
            deltas=delta,
            confidences=confidence,
            event_times_ms=times,
        )
        hexes = [a.hex() for a in addresses]
        # (address, bucket) as one int64: address code * bucket span + bucket index
        bucket = times // self._bucket_ms
        low = int(bucket.min())
        span = int(bucket.max()) - low + 1
        pairs, pair_codes = dense_codes(address * span + (bucket - low), len(hexes) * span)
        keys = [(hexes[p // span], (low + p % span) * self._bucket_ms) for p in pairs.tolist()]
        windowed = synthesize_columns((pair_codes, keys), **columns)
        _set_templates(windowed.values(), template, pair_codes, len(keys), templates)
        used, address_codes = dense_codes(address, len(hexes))
        all_time = synthesize_columns((address_codes, [hexes[a] for a in used.tolist()]), **columns)
        _set_templates(all_time.values(), template, address_codes, len(used), templates)
        return windowed, all_time


def _set_templates(partials, template, groups, n_groups, vocabulary) -> None:
    """Each group's template id: the lexicographically smallest of its packets' (as
    :class:`Synthesis` keeps it; empty ids count as unset)."""
    ranked = sorted(range(len(vocabulary)), key=lambda i: (not vocabulary[i], vocabulary[i]))
    rank_of = np.empty(len(vocabulary), dtype=np.int64)
    rank_of[ranked] = np.arange(len(vocabulary))
    best = np.full(n_groups, len(vocabulary), dtype=np.int64)
    np.minimum.at(best, groups, rank_of[template])
    for partial, rank in zip(partials, best.tolist(), strict=True):
        partial.template_id = vocabulary[ranked[rank]] or None


def _codes(scan: ScannedRecords, start, length, vocabulary: dict, decode) -> np.ndarray:
    """The vocabulary code of each row's bytes field (-1 in rows the scan could not read)."""
    codes = np.full(len(start), -1, dtype=np.int64)
    rows = np.flatnonzero(scan.ok)
    if not len(rows):
        return codes
    start = start[rows]
    length = length[rows] if np.ndim(length) else np.full(len(rows), length)

    def code(i: int) -> int:
        value = decode(scan.bytes_at(int(start[i]), int(length[i])))
        found = vocabulary.get(value)
        return found if found is not None else vocabulary.setdefault(value, len(vocabulary))

    groups, first, same = scan.group(start, length)
    found = np.array([code(i) for i in first.tolist()], dtype=np.int64)[groups]
    for i in np.flatnonzero(~same).tolist():  # a group key shared by different bytes
        found[i] = code(i)
    codes[rows] = found
    return codes
