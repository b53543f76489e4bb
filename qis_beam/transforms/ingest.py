"""Ingestion of spec section 4 in batch: validate, dead-letter, deduplicate (batch rule).

Validation runs per record batch (no per-record Beam overhead), with the batch's signatures
verified on a thread pool (libsodium releases the GIL). Deduplication needs every
copy of a packet_id in one place, so valid packets are shuffled by packet_id into
``dedupe_shards`` groups (lists, not single records, cross the shuffle); each group keeps,
per packet_id, the lexicographically smallest payload: identical extra copies are counted
as duplicates, copies with any other payload are ``conflicting_duplicate`` dead letters.
The verdict does not depend on arrival order, bundling or sharding. With more than one
shard the kept payloads are regrouped by address before folding.

Memory: the runner's shuffle holds every valid record once. Flink and Dataflow spill it to
disk; the FnApiRunner keeps it in memory, so a local backfill's peak memory grows with the
number of packets (measured in benchmarks/).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from qis_beam.dedupe import dedupe
from qis_beam.proto import packet_pb2
from qis_beam.signing import ThreadedVerifier
from qis_beam.transforms.deadletters import DEAD_LETTERS, counter, dead_letter
from qis_beam.validation import DUPLICATE_REASON, Rejection, ValidationPolicy, validate_batch

# (source, [(packet_id, record), ...]) for one dedupe shard of one read batch
ShardSlice = tuple[str, list[tuple[bytes, bytes]]]


def payload_of(record: bytes) -> bytes:
    envelope = packet_pb2.Envelope()
    envelope.ParseFromString(record)
    return envelope.payload


class _ValidateBatchFn(beam.DoFn):
    def __init__(self, policy: ValidationPolicy, shards: int):
        self._policy = policy
        self._shards = shards

    def setup(self) -> None:
        self._verifier = ThreadedVerifier()

    def teardown(self) -> None:
        self._verifier.close()

    def process(self, batch: tuple[str, list[bytes]]) -> Iterator:
        source, records = batch
        policy, shards, now_ms = self._policy, self._shards, self._policy.clock_ms()
        by_shard: list[list[tuple[bytes, bytes]]] = [[] for _ in range(shards)]
        verdicts = validate_batch(records, policy, now_ms, self._verifier)
        for record, verdict in zip(records, verdicts, strict=True):
            if isinstance(verdict, Rejection):
                yield TaggedOutput(
                    DEAD_LETTERS,
                    dead_letter(verdict.reason, verdict.detail, record, verdict.packet_id, source),
                )
                continue
            packet_id = verdict.packet.packet_id
            by_shard[packet_id[0] % shards].append((packet_id, record))
        for shard, items in enumerate(by_shard):
            if items:
                yield f"{shard:04d}", (source, items)


class _DedupeShardFn(beam.DoFn):
    """All copies of the packet_ids of one shard -> the kept packets' payloads."""

    def process(self, element: tuple[str, Iterable[ShardSlice]]) -> Iterator:
        _, slices = element
        copies = (
            (packet_id, record, source) for source, items in slices for packet_id, record in items
        )
        result = dedupe(copies, payload_of)
        for packet_id, record, source in result.conflicts:
            detail = "same packet_id as a packet with a smaller payload, which is kept"
            yield TaggedOutput(
                DEAD_LETTERS, dead_letter(DUPLICATE_REASON, detail, record, packet_id, source)
            )
        counter("duplicates").inc(result.duplicates)
        counter("valid").inc(len(result.kept))
        # Payload bytes, not parsed messages, cross transform boundaries: they encode cheaply.
        yield [payload_of(record) for record in result.kept.values()]


class _SplitByAddressFn(beam.DoFn):
    """Kept payloads of one dedupe shard -> one list per address bucket."""

    def __init__(self, buckets: int):
        self._buckets = buckets

    def process(self, payloads: list[bytes]) -> Iterator[tuple[str, list[bytes]]]:
        by_bucket: dict[int, list[bytes]] = {}
        for payload in payloads:
            address = packet_pb2.OutcomePacket.FromString(payload).semantic_address
            by_bucket.setdefault(address[0] % self._buckets, []).append(payload)
        for bucket, items in by_bucket.items():
            yield f"{bucket:04d}", items


class IngestBatches(beam.PTransform):
    """Record batches -> lists of valid, deduplicated payloads; dead letters on a side output."""

    def __init__(self, policy: ValidationPolicy, dedupe_shards: int):
        super().__init__()
        self._policy = policy
        self._shards = dedupe_shards

    def expand(self, batches):
        validated = batches | "Validate" >> beam.ParDo(
            _ValidateBatchFn(self._policy, self._shards)
        ).with_outputs(DEAD_LETTERS, main="valid")
        deduped = (
            validated.valid
            # a typed str key: a deterministic key coder on every runner
            | "TypedShardKey" >> beam.Map(lambda kv: kv).with_output_types(tuple[str, ShardSlice])
            | "ShuffleByPacketId" >> beam.GroupByKey()
            | "Dedupe" >> beam.ParDo(_DedupeShardFn()).with_outputs(DEAD_LETTERS, main="packets")
        )
        dead = (
            validated[DEAD_LETTERS],
            deduped[DEAD_LETTERS],
        ) | "MergeDeadLetters" >> beam.Flatten()
        return deduped.packets, dead
