"""Live transports: URL and rate parsing, Kafka and Pub/Sub round trips, the live simulator.

Kafka tests publish to a real KRaft broker (fixture ``kafka_bootstrap``) and read back with
confluent-kafka; the Pub/Sub test pulls from the emulator (``pubsub_emulator_host``).
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from conftest import HOUR_MS, T0_MS, make_record, node_key

from qis_beam.cli import main
from qis_beam.emitter import OutcomeEmitter, OutcomeType
from qis_beam.sim.sending import Pacer as _Pacer
from qis_beam.sim.sending import PublishStats, publish_records
from qis_beam.tfrecords import iter_records
from qis_beam.transports import (
    TIMESTAMP_ATTRIBUTE,
    KafkaTransport,
    RecordMeta,
    TransportError,
    TransportURL,
    open_transport,
    parse_rate,
    parse_transport_url,
    record_meta,
)
from qis_beam.wire import decode_record

CONTEXT = {"task": "causal-lm", "model_family": "llama", "params": 1e9, "dataset": "c4"}


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("kafka://127.0.0.1:9092/outcomes", TransportURL("kafka", "outcomes", "127.0.0.1:9092")),
        (
            "kafka://a:1,b.example:29092/x.y-z",
            TransportURL("kafka", "x.y-z", "a:1,b.example:29092"),
        ),
        (
            "pubsub://projects/my-proj/topics/outcomes",
            TransportURL("pubsub", "projects/my-proj/topics/outcomes"),
        ),
        ("file:///var/log/qis", TransportURL("file", "/var/log/qis")),
        ("file://logs", TransportURL("file", "logs")),
    ],
)
def test_transport_urls(url, expected):
    parsed = parse_transport_url(url)
    assert parsed == expected
    assert str(parsed) == url


@pytest.mark.parametrize(
    "url",
    [
        "outcomes",
        "http://host:1/t",
        "kafka://host/t",  # no port
        "kafka://host:0/t",
        "kafka://host:99999/t",
        "kafka://host:9092",  # no topic
        "kafka://host:9092/bad topic",
        "pubsub://projects/p/topics/t",  # project and topic names too short
        "pubsub://projects/my-proj/subscriptions/s",
        "file://",
    ],
)
def test_bad_transport_urls(url):
    with pytest.raises(ValueError) as error:
        parse_transport_url(url)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, per_second",
    [("500/s", 500.0), ("30/m", 0.5), ("7200/h", 2.0), ("2.5", 2.5), ("10 / min", 10 / 60)],
)
def test_rates(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "fast", "0/s", "-5/s", "5/d", "5/s/s"])
def test_bad_rates(text):
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--live", "--to", "kafka://nohost/t"], "--to"),
        (["simulate", "--live", "--to", "file:///tmp/x", "--rate", "lots"], "not a rate"),
        (["simulate", "--live", "--to", "file:///tmp/x", "--duration", "soon"], "--duration"),
        (["simulate", "--live"], "--live needs --to"),
        (["simulate", "--out", "x", "--to", "file:///tmp/x"], "need --live"),
        (["simulate"], "--out"),
        (["publish", "--input", "x", "--to", "pubsub://topics/t"], "--to"),
        (["publish", "--input", "/nonexistent/*.tfrecord", "--to", "file:///tmp/x"], "no files"),
    ],
)
def test_bad_live_arguments_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_pacer_holds_its_rate_on_a_fake_clock():
    now = [100.0]
    pacer = _Pacer(50.0, 2.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    while pacer.wait_turn():
        pacer.sent += 1
    assert pacer.sent == 100  # 2 s at 50/s: the 101st would be due at the end


def test_record_meta_and_file_transport(tmp_path):
    record = make_record(event_time_ms=T0_MS + 5)
    meta = record_meta(record)
    assert meta.event_time_ms == T0_MS + 5 and len(meta.address) == 32
    assert record_meta(b"\xff\xff garbage") == RecordMeta(None, None)
    with open_transport(f"file://{tmp_path}/logs") as transport:
        stats = publish_records([record, b"garbage"], transport)
    assert stats.records == 2
    (path,) = (tmp_path / "logs").glob("packets-live-*.tfrecord")
    assert list(iter_records(path.read_bytes())) == [record, b"garbage"]


def test_emitter_keeps_its_api_and_can_publish_only(tmp_path):
    with pytest.raises(ValueError, match="log_path"):
        OutcomeEmitter(node_key(1), None, "llm-finetune/v1", CONTEXT)
    with OutcomeEmitter.open(
        key_file=tmp_path / "node.key",
        template_id="llm-finetune/v1",
        context=CONTEXT,
        to=f"file://{tmp_path}/out",
    ) as emitter:
        record = emitter.emit(
            approach_id="optimizer=lion", outcome_type=OutcomeType.PARTIAL, outcome_delta=0.01,
            confidence=0.5,
        )  # fmt: skip
    (path,) = (tmp_path / "out").glob("*.tfrecord")
    assert list(iter_records(path.read_bytes())) == [record]


# --- Kafka -----------------------------------------------------------------------------------


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0):
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            assert message.error() is None, message.error()
            messages.append(message)
        # Nothing more than what was sent.
        extra = consumer.poll(2.0)
        assert extra is None, "more records than were published"
    finally:
        consumer.close()
    return messages


@pytest.mark.slow
def test_emitter_publishes_to_kafka_keyed_by_address_at_event_time(kafka_bootstrap, tmp_path):
    from confluent_kafka import TIMESTAMP_CREATE_TIME

    topic = f"outcomes-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "node.tfrecord"
    with OutcomeEmitter.open(
        key_file=tmp_path / "node.key",
        log_path=log,
        template_id="llm-finetune/v1",
        context=CONTEXT,
        to=f"kafka://{kafka_bootstrap}/{topic}",
    ) as emitter:
        sent = [
            emitter.emit(
                approach_id=f"optimizer=adamw{i}",
                outcome_type=OutcomeType.PARTIAL,
                outcome_delta=0.01 * i,
                confidence=0.5,
                event_time_ms=T0_MS + 1000 * i,
            )
            for i in range(20)
        ]
    assert list(iter_records(log.read_bytes())) == sent  # the log still gets every packet
    messages = _consume(kafka_bootstrap, topic, len(sent))
    assert sorted(m.value() for m in messages) == sorted(sent)
    for message in messages:
        _, packet = decode_record(message.value())
        assert message.key() == emitter.address == packet.semantic_address
        assert message.timestamp() == (TIMESTAMP_CREATE_TIME, packet.event_time_ms)
    # One address, one partition: the node's packets keep their order.
    assert len({m.partition() for m in messages}) == 1
    in_order = [m.value() for m in sorted(messages, key=lambda m: m.offset())]
    assert in_order == sent


def test_kafka_delivery_failure_is_raised_not_swallowed():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    transport = KafkaTransport(
        parse_transport_url(f"kafka://127.0.0.1:{port}/outcomes"),
        config={"message.timeout.ms": 1500},
    )
    transport.publish(make_record())
    with pytest.raises(TransportError, match="Kafka delivery failed"):
        transport.close()


@pytest.mark.slow
def test_kafka_far_future_event_time_is_stamped_with_the_send_time(kafka_bootstrap):
    """A node whose clock says 2100 must not fail its batch (Kafka 4 rejects timestamps over
    an hour ahead, and the whole batch with it); its packet is sent unchanged."""
    topic = f"future-{uuid.uuid4().hex[:8]}"
    future = make_record(packet_id=b"f" * 16, event_time_ms=4_102_444_800_000)
    normal = [make_record(packet_id=bytes([i]) * 16, event_time_ms=T0_MS + i) for i in range(5)]
    before = int(time.time() * 1000)
    with open_transport(f"kafka://{kafka_bootstrap}/{topic}") as transport:
        for record in [*normal[:2], future, *normal[2:]]:
            transport.publish(record)
    after = int(time.time() * 1000)
    messages = {m.value(): m for m in _consume(kafka_bootstrap, topic, 6)}
    assert set(messages) == {future, *normal}
    assert before <= messages[future].timestamp()[1] <= after
    assert [messages[r].timestamp()[1] for r in normal] == [T0_MS + i for i in range(5)]


@pytest.mark.slow
def test_simulate_live_to_kafka_holds_its_rate(kafka_bootstrap, tmp_path, capsys):
    topic = f"live-{uuid.uuid4().hex[:8]}"
    started_ms = int(time.time() * 1000)
    code = main(
        [
            "simulate", "--live", "--rate", "300/s", "--duration", "4s",
            "--to", f"kafka://{kafka_bootstrap}/{topic}", "--out", str(tmp_path / "swarm"),
            "--nodes", "40", "--addresses", "5", "--malformed-fraction", "0.02",
        ]
    )  # fmt: skip
    ended_ms = int(time.time() * 1000)
    assert code == 0
    line = capsys.readouterr().out.splitlines()[0]  # "sent N records (...) in 4.0s (R/s)"
    sent = int(line.split()[1])
    rate = float(line.rsplit("(", 1)[1].split("/s")[0])
    print(f"simulate --live to Kafka: {sent} records in 4 s, measured {rate:.0f}/s")
    assert 0.8 * 300 <= rate <= 1.2 * 300
    assert 0.8 * 1200 <= sent <= 1.2 * 1200
    messages = _consume(kafka_bootstrap, topic, sent)
    assert len(messages) == sent
    lags = []
    for message in messages:
        meta = record_meta(message.value())
        if meta.event_time_ms is None:  # a torn record: stamped when sent
            assert started_ms <= message.timestamp()[1] <= ended_ms + 1000
            continue
        assert message.key() == meta.address
        assert message.timestamp()[1] == meta.event_time_ms
        lags.append(ended_ms - meta.event_time_ms)
    # Current event times: most packets are seconds old; late edge nodes lag >= 1 h.
    lags.sort()
    assert lags[len(lags) // 2] < 10_000
    assert any(lag >= HOUR_MS for lag in lags)
    assert (tmp_path / "swarm" / "nodes.txt").exists()


@pytest.mark.slow
def test_publish_a_log_to_kafka_keeps_event_times(kafka_bootstrap, tmp_path, capsys):
    swarm = tmp_path / "swarm"
    assert main(["simulate", "--out", str(swarm), "--packets", "300", "--shards", "2"]) == 0
    records = [
        r for p in sorted(swarm.glob("packets-*.tfrecord")) for r in iter_records(p.read_bytes())
    ]
    topic = f"log-{uuid.uuid4().hex[:8]}"
    url = f"kafka://{kafka_bootstrap}/{topic}"
    assert main(["publish", "--input", str(swarm / "packets-*.tfrecord"), "--to", url]) == 0
    assert f"published {len(records)} records from 2 files" in capsys.readouterr().out
    messages = _consume(kafka_bootstrap, topic, len(records))
    assert sorted(m.value() for m in messages) == sorted(records)
    for message in messages:
        meta = record_meta(message.value())
        if meta.event_time_ms is not None:
            assert message.timestamp()[1] == meta.event_time_ms  # 2026-01-01, not now


# --- Pub/Sub ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_emitter_publishes_to_pubsub_with_the_event_time_attribute(
    pubsub_emulator_host, monkeypatch, tmp_path
):
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator_host)
    tag = uuid.uuid4().hex[:8]
    topic = f"projects/qis-test/topics/outcomes-{tag}"
    subscription = f"projects/qis-test/subscriptions/check-{tag}"
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    try:
        with OutcomeEmitter.open(
            key_file=tmp_path / "node.key",
            template_id="llm-finetune/v1",
            context=CONTEXT,
            to=f"pubsub://{topic}",
        ) as emitter:
            sent = {
                emitter.emit(
                    approach_id="optimizer=lion",
                    outcome_type=OutcomeType.RESOLVED,
                    outcome_delta=0.03,
                    confidence=0.9,
                    event_time_ms=T0_MS + i,
                ): T0_MS + i
                for i in range(50)
            }
            emitter.transport.publish(b"\xff garbage")  # no event time: stamped when sent
        received = {}
        deadline = time.monotonic() + 60
        while len(received) < len(sent) + 1 and time.monotonic() < deadline:
            response = subscriber.pull(subscription=subscription, max_messages=100, timeout=10)
            for m in response.received_messages:
                received[m.message.data] = dict(m.message.attributes)
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=subscription,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
    finally:
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
    garbage = received.pop(b"\xff garbage")
    assert abs(int(garbage[TIMESTAMP_ATTRIBUTE]) - time.time() * 1000) < 120_000
    assert received == {record: {TIMESTAMP_ATTRIBUTE: str(ms)} for record, ms in sent.items()}


def test_publish_stats_rate():
    assert PublishStats(100, 2.0).rate == 50.0 and PublishStats(0, 0.0).rate == 0.0
