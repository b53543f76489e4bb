"""Where a node's signed envelopes go: Kafka, Pub/Sub or a local TFRecord log, by URL.

``open_transport(url)`` gives one interface for all three:

* ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC`` -- a confluent-kafka producer. The record key
  is the packet's semantic address (an address stays on one partition, so its packets keep
  their order) and the record timestamp is the packet's event time, which a Kafka source
  with ``CreateTime`` timestamps turns into the element timestamp and watermark.
* ``pubsub://projects/P/topics/T`` -- a google-cloud-pubsub publisher (``PUBSUB_EMULATOR_HOST``
  is honoured by the client). The attribute ``event_time_ms`` carries the event time in ms,
  for ``qis-beam run --timestamp-attribute event_time_ms``.
* ``file://DIR`` -- appends to today's (UTC) log ``DIR/packets-live-YYYYMMDD.tfrecord``,
  which ``backfill --input 'DIR/packets-*.tfrecord'`` reads.

Every transport takes raw Envelope bytes, valid or not: the pipeline, not the sender, decides
what is a dead letter. Records that do not parse get no key and the current time as their
timestamp (a Pub/Sub timestamp attribute must always be present: Dataflow rejects messages
without it). So does a record whose event time is more than ``MAX_FUTURE_MS`` ahead of the
sender's clock (a node whose clock was reset to 2100): Kafka 4 brokers reject timestamps
over an hour ahead (``log.message.timestamp.after.max.ms``) and fail the *whole producer
batch* with it, and a far-future timestamp could drag a timestamp-driven watermark forward.
The packet itself is unchanged, so the pipeline still dead-letters it as
``future_event_time``. Delivery failures are raised, at the latest by ``flush``/``close``,
never swallowed.

Beam-free: Kafka and Pub/Sub senders import only their client library; the file transport
imports the TFRecord framing (and with it Beam) when it is opened.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import threading
import time
from typing import BinaryIO, Protocol

from qis_beam.wire import DEFAULT_MAX_CLOCK_SKEW_MS, WireError, decode_record

TIMESTAMP_ATTRIBUTE = "event_time_ms"
# Event times further ahead of the sender's clock are sent stamped with that clock: the
# validator's default max clock skew, so every packet a pipeline accepts keeps its own time.
MAX_FUTURE_MS = DEFAULT_MAX_CLOCK_SKEW_MS
SCHEMES = ("kafka", "pubsub", "file")

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
# Beam's own rules (apache_beam.io.gcp.pubsub), so a URL the CLI accepts is one Beam reads.
_PUBSUB_TOPIC = re.compile(
    r"^projects/([a-z][-a-z0-9:.]{4,61}[a-z0-9])/topics/([a-zA-Z][-_.~+%a-zA-Z0-9]{2,254})$"
)


class TransportError(RuntimeError):
    """A record could not be delivered."""


@dataclasses.dataclass(frozen=True)
class TransportURL:
    scheme: str  # "kafka" | "pubsub" | "file"
    target: str  # topic (kafka), projects/P/topics/T (pubsub), directory (file)
    servers: str = ""  # kafka only: bootstrap servers "host:port,host:port"

    def __str__(self) -> str:
        if self.scheme == "kafka":
            return f"kafka://{self.servers}/{self.target}"
        return f"{self.scheme}://{self.target}"


def parse_transport_url(url: str) -> TransportURL:
    """``kafka://H:P/T``, ``pubsub://projects/P/topics/T`` or ``file://DIR``; ValueError else."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"not a transport URL: {url!r} (use kafka://HOST:PORT/TOPIC, "
            "pubsub://projects/P/topics/T or file://DIR)"
        )
    if scheme == "file":
        if not rest:
            raise ValueError(f"file URL without a directory: {url!r}")
        return TransportURL("file", rest)
    if scheme == "pubsub":
        if not _PUBSUB_TOPIC.match(rest):
            raise ValueError(f"not a Pub/Sub topic URL: {url!r} (use pubsub://projects/P/topics/T)")
        return TransportURL("pubsub", rest)
    servers, slash, topic = rest.partition("/")
    if not slash or not _KAFKA_TOPIC.match(topic):
        raise ValueError(f"Kafka URL needs a topic of [A-Za-z0-9._-]: {url!r}")
    for server in servers.split(","):
        match = _HOST_PORT.match(server)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(f"Kafka URL needs HOST:PORT servers, got {server!r} in {url!r}")
    return TransportURL("kafka", topic, servers)


@dataclasses.dataclass(frozen=True)
class RecordMeta:
    event_time_ms: int | None  # the packet's own event time, None if it does not parse
    address: bytes | None  # its semantic address


def record_meta(record: bytes) -> RecordMeta:
    """Event time and address of an Envelope, best effort (a malformed record gives Nones)."""
    try:
        _, packet = decode_record(record)
    except WireError:
        return RecordMeta(None, None)
    event = packet.event_time_ms if packet.event_time_ms > 0 else None
    return RecordMeta(event, packet.semantic_address or None)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Transport(Protocol):
    url: TransportURL

    def publish(
        self, record: bytes, event_time_ms: int | None = None, key: bytes | None = None
    ) -> None:
        """Send one record; ``event_time_ms``/``key`` default to what the record carries."""

    def flush(self) -> None:
        """Block until everything sent so far is delivered; raise TransportError otherwise."""

    def close(self) -> None:
        """Flush, then release the client."""


class _Base:
    url: TransportURL

    def _meta(self, record: bytes, event_time_ms: int | None, key: bytes | None):
        if event_time_ms is None or key is None:
            meta = record_meta(record)
            event_time_ms = event_time_ms if event_time_ms is not None else meta.event_time_ms
            key = key if key is not None else meta.address
        now = _now_ms()
        if event_time_ms is None or event_time_ms > now + MAX_FUTURE_MS:
            event_time_ms = now
        return event_time_ms, key

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KafkaTransport(_Base):
    """confluent-kafka producer: key = address, record timestamp = event time (CreateTime)."""

    def __init__(self, url: TransportURL, config: dict | None = None):
        from confluent_kafka import Producer

        self.url = url
        settings = {
            "bootstrap.servers": url.servers,
            "acks": "all",
            "enable.idempotence": True,  # retries never duplicate or reorder a partition
            "linger.ms": 5,  # small batches: throughput without visible delay
            "compression.type": "lz4",
            "message.timeout.ms": 30_000,
        }
        settings.update(config or {})
        self._producer = Producer(settings)
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def _on_delivery(self, error, message) -> None:
        if error is not None:
            with self._lock:
                self._errors.append(f"{message.topic()}: {error}")

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise TransportError(f"Kafka delivery failed: {errors[0]}{more}")

    def publish(
        self, record: bytes, event_time_ms: int | None = None, key: bytes | None = None
    ) -> None:
        timestamp, key = self._meta(record, event_time_ms, key)
        while True:
            try:
                self._producer.produce(
                    self.url.target,
                    value=record,
                    key=key,
                    timestamp=timestamp,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.1)
        self._producer.poll(0)
        self._raise_errors()

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self._producer.flush(timeout_s)
        self._raise_errors()
        if remaining:
            raise TransportError(f"Kafka: {remaining} records undelivered after {timeout_s}s")

    def close(self) -> None:
        self.flush()


class PubSubTransport(_Base):
    """google-cloud-pubsub publisher with the event time in the ``event_time_ms`` attribute."""

    def __init__(self, url: TransportURL, max_outstanding: int = 10_000):
        from google.cloud import pubsub_v1
        from google.cloud.pubsub_v1 import types

        self.url = url
        self._client = pubsub_v1.PublisherClient(
            # Batches of up to 500 messages or 10 ms: the client's defaults (100 messages,
            # 10 ms) cap one publisher at a few thousand messages/s.
            batch_settings=types.BatchSettings(
                max_messages=500, max_bytes=1_000_000, max_latency=0.01
            ),
            publisher_options=types.PublisherOptions(
                flow_control=types.PublishFlowControl(
                    message_limit=max_outstanding,
                    limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK,
                )
            ),
        )
        self._pending: set = set()
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def _done(self, future) -> None:
        error = future.exception()
        with self._lock:
            if future not in self._pending:  # already accounted for
                return
            self._pending.discard(future)
            if error is not None:
                self._errors.append(str(error).splitlines()[0] if str(error) else repr(error))

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise TransportError(f"Pub/Sub publish failed: {errors[0]}{more}")

    def publish(
        self, record: bytes, event_time_ms: int | None = None, key: bytes | None = None
    ) -> None:
        timestamp, _ = self._meta(record, event_time_ms, key)
        future = self._client.publish(
            self.url.target, record, **{TIMESTAMP_ATTRIBUTE: str(timestamp)}
        )
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        self._raise_errors()

    def flush(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(
                    f"Pub/Sub: {len(pending)} messages unconfirmed after {timeout_s}s"
                )
            try:
                pending[0].result(timeout=left)
            except Exception:  # noqa: BLE001 - recorded by _done, raised below
                pass
            self._done(pending[0])  # idempotent: the callback may not have run yet
        self._raise_errors()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._client.stop()


class FileTransport(_Base):
    """Appends TFRecord-framed envelopes to today's (UTC) log file in a directory."""

    def __init__(self, url: TransportURL):
        from qis_beam.tfrecords import write_record  # Beam's framing (and Beam) only here

        self.url = url
        self._write = write_record
        self._dir = os.path.expanduser(url.target)
        os.makedirs(self._dir, exist_ok=True)
        self._day: str | None = None
        self._handle: BinaryIO | None = None

    def path_for(self, day: str) -> str:
        return os.path.join(self._dir, f"packets-live-{day}.tfrecord")

    def publish(
        self, record: bytes, event_time_ms: int | None = None, key: bytes | None = None
    ) -> None:
        day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
        if day != self._day:
            if self._handle is not None:
                self._handle.close()
            self._handle = open(self.path_for(day), "ab")  # noqa: SIM115 - closed by close()
            self._day = day
        self._write(self._handle, record)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def open_transport(url: str | TransportURL, **options) -> Transport:
    """A connected transport for ``url``; ValueError on a bad URL."""
    parsed = url if isinstance(url, TransportURL) else parse_transport_url(url)
    if parsed.scheme == "kafka":
        return KafkaTransport(parsed, **options)
    if parsed.scheme == "pubsub":
        return PubSubTransport(parsed, **options)
    return FileTransport(parsed, **options)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h))?\s*$")
_PER_SECOND = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 1 / 60, "min": 1 / 60, "h": 1 / 3600}


def parse_rate(text: str) -> float:
    """Records per second in ``500/s``, ``30/m``, ``2/h`` (a bare number is per second)."""
    match = _RATE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a rate: {text!r} (use e.g. 500/s, 30/m)")
    return float(match.group(1)) * _PER_SECOND[match.group(2)]
