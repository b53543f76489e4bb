"""What a training node imports: build, address, sign and log outcome packets.

Example, inside a training loop::

    from qis_beam.emitter import OutcomeEmitter, OutcomeType

    emitter = OutcomeEmitter.open(
        key_file="~/.qis/node.key",            # created on first use, mode 0600
        log_path="/var/log/qis/packets-node17.tfrecord",
        template_id="llm-finetune/v1",
        context={"task": "causal-lm", "model_family": "llama", "params": 1e9, "dataset": "c4"},
    )
    with emitter:
        emitter.emit(
            approach_id="lr_schedule=cosine",
            outcome_type=OutcomeType.PARTIAL,
            outcome_delta=0.04,               # validated improvement of the target metric
            confidence=0.8,
            sample_count=2000,
            metrics={"eval_loss": 2.31},
        )

The context is canonicalised and hashed on the node (:mod:`qis_beam.address`); only the
32-byte address, the approach and the measured outcome leave it.

Live delivery: pass ``to="kafka://broker:9092/outcomes"`` (or ``pubsub://projects/P/topics/T``,
``file://DIR``; see :mod:`qis_beam.transports`) to publish each envelope as well as, or
instead of, appending it to ``log_path``. Kafka records are keyed by the address and stamped
with the event time; Pub/Sub messages carry it in the ``event_time_ms`` attribute.
"""

from __future__ import annotations

import enum
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

from qis_beam.address import semantic_address
from qis_beam.signing import NodeKey
from qis_beam.tfrecords import write_record
from qis_beam.transports import Transport, TransportURL, open_transport
from qis_beam.wire import OUTCOME_NAMES, PACKET_ID_BYTES, SCHEMA_VERSION, Envelope, OutcomePacket

# What a node reports (spec section 2), named and numbered as the proto enum has them.
OutcomeType = enum.IntEnum("OutcomeType", {name: n for n, name in OUTCOME_NAMES.items()})


def build_packet(
    *,
    key: NodeKey,
    address: bytes,
    template_id: str,
    approach_id: str,
    outcome_type: int,
    outcome_delta: float,
    confidence: float,
    sample_count: int = 0,
    event_time_ms: int | None = None,
    emit_time_ms: int | None = None,
    metrics: Mapping[str, float] | None = None,
    context_embedding: Sequence[float] | None = None,
    packet_id: bytes | None = None,
) -> OutcomePacket:
    now_ms = int(time.time() * 1000)
    packet = OutcomePacket(
        schema_version=SCHEMA_VERSION,
        packet_id=packet_id if packet_id is not None else os.urandom(PACKET_ID_BYTES),
        node_id=key.node_id,
        semantic_address=address,
        template_id=template_id,
        approach_id=approach_id,
        outcome_type=int(outcome_type),
        outcome_delta=float(outcome_delta),
        confidence=float(confidence),
        sample_count=int(sample_count),
        event_time_ms=event_time_ms if event_time_ms is not None else now_ms,
        emit_time_ms=emit_time_ms if emit_time_ms is not None else now_ms,
        metrics=dict(metrics or {}),
        context_embedding=list(context_embedding or ()),
    )
    return packet


def seal(key: NodeKey | None, packet: OutcomePacket, *, public_key: bytes = b"") -> bytes:
    """Serialize and sign a packet into Envelope bytes (unsigned when ``key`` is None)."""
    payload = packet.SerializeToString(deterministic=True)
    if key is None:
        return Envelope(payload=payload, public_key=public_key).SerializeToString()
    envelope = Envelope(payload=payload, signature=key.sign(payload), public_key=key.public_key)
    return envelope.SerializeToString()


class OutcomeEmitter:
    """One node's emitter for one problem context: appends signed envelopes to a log file
    and/or publishes them to a transport (Kafka, Pub/Sub)."""

    def __init__(
        self,
        key: NodeKey,
        log_path: str | os.PathLike | None,
        template_id: str,
        context: Mapping[str, object],
        to: str | TransportURL | Transport | None = None,
    ):
        if log_path is None and to is None:
            raise ValueError("OutcomeEmitter needs a log_path, a transport (to=...) or both")
        self.key = key
        self.template_id = template_id
        self.address = semantic_address(template_id, context)
        self._log = None
        if log_path is not None:
            path = pathlib.Path(log_path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "ab")  # noqa: SIM115 - closed by close()/__exit__
        # A URL is opened (and closed) here; a Transport object passed in stays the caller's.
        self._owns_transport = isinstance(to, (str, TransportURL))
        self.transport: Transport | None = open_transport(to) if self._owns_transport else to

    @classmethod
    def open(
        cls,
        *,
        key_file: str | os.PathLike,
        log_path: str | os.PathLike | None = None,
        template_id: str,
        context: Mapping[str, object],
        to: str | TransportURL | Transport | None = None,
    ) -> OutcomeEmitter:
        key = NodeKey.load_or_create(pathlib.Path(key_file).expanduser())
        return cls(key, log_path, template_id, context, to=to)

    def emit(
        self,
        *,
        approach_id: str,
        outcome_type: int,
        outcome_delta: float,
        confidence: float,
        sample_count: int = 0,
        metrics: Mapping[str, float] | None = None,
        event_time_ms: int | None = None,
        context_embedding: Sequence[float] | None = None,
    ) -> bytes:
        """Build, sign, append and/or publish one packet; returns the Envelope bytes."""
        packet = build_packet(
            key=self.key,
            address=self.address,
            template_id=self.template_id,
            approach_id=approach_id,
            outcome_type=outcome_type,
            outcome_delta=outcome_delta,
            confidence=confidence,
            sample_count=sample_count,
            event_time_ms=event_time_ms,
            metrics=metrics,
            context_embedding=context_embedding,
        )
        record = seal(self.key, packet)
        if self._log is not None:
            write_record(self._log, record)
            self._log.flush()
        if self.transport is not None:
            self.transport.publish(record, event_time_ms=packet.event_time_ms, key=self.address)
        return record

    def flush(self) -> None:
        """Wait until every published envelope is delivered (raises on a delivery failure)."""
        if self.transport is not None:
            self.transport.flush()

    def close(self) -> None:
        try:
            if self.transport is not None:
                if self._owns_transport:
                    self.transport.close()
                else:
                    self.transport.flush()
        finally:
            if self._log is not None:
                self._log.close()

    def __enter__(self) -> OutcomeEmitter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
