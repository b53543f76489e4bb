"""Single-node Kafka broker in KRaft mode (broker and controller in one JVM)."""

from __future__ import annotations

import base64
import subprocess
import uuid
from pathlib import Path

from qis_beam.stack.fetch import fetch_kafka, require_tool
from qis_beam.stack.procs import spawn
from qis_beam.stack.state import Piece

NAME = "kafka"
PORTS = ("broker", "controller")
HEAP = "-Xmx512m"

LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def server_properties(data: Path, broker: int, controller: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": 1,
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        # One broker: every internal topic has one replica.
        "num.partitions": 1,
        "offsets.topic.replication.factor": 1,
        # 1 partition instead of 50 for the internal topics: the first consumer group and the
        # first transaction then start in well under a second on a small machine.
        "offsets.topic.num.partitions": 1,
        "transaction.state.log.num.partitions": 1,
        "share.coordinator.state.topic.num.partitions": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        "auto.create.topics.enable": "true",
        # Consumers in tests join at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms": 0,
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def _java(home: Path, log4j: Path) -> list[str]:
    java = require_tool("java", "Kafka needs Java 17 (apt-get install openjdk-17-jre-headless)")
    return [java, HEAP, f"-Dlog4j2.configurationFile={log4j}", "-cp", str(home / "lib" / "*")]


def random_cluster_id() -> str:
    """Kafka's cluster id form: a UUID as 22 URL-safe base64 characters, never starting with
    "-" (Kafka's ``Uuid.randomUuid`` draws again too: the storage tool's parser reads
    ``-t -x...`` as a missing id, and 1 broker in 64 failed to format)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def launch(state_dir: Path, ports: dict[str, int]) -> Piece:
    home = fetch_kafka().path
    state = Path(state_dir) / NAME
    data = state / "data"
    state.mkdir(parents=True, exist_ok=True)
    config = state / "server.properties"
    config.write_text(server_properties(data, ports["broker"], ports["controller"]))
    log4j = state / "log4j2.properties"
    log4j.write_text(LOG4J2)
    log = state / "kafka.log"
    if not (data / "meta.properties").exists():
        # Storage is formatted once per state dir; a restart keeps the topics.
        with open(log, "ab") as out:
            subprocess.run(
                _java(home, log4j)
                + [
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    random_cluster_id(),
                    "-c",
                    str(config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
    broker = spawn("broker", _java(home, log4j) + ["kafka.Kafka", str(config)], log, cwd=state)
    bootstrap = f"127.0.0.1:{ports['broker']}"
    return Piece(
        name=NAME,
        procs=[broker],
        endpoints={"bootstrap": bootstrap},
        log=str(log),
        data={"home": str(home), "state": str(state)},
    )


def healthy(piece: Piece) -> bool:
    """The broker answers a metadata request through the bootstrap address."""
    from confluent_kafka.admin import AdminClient

    # log_level 0: librdkafka would print a line per refused connection while we poll.
    admin = AdminClient({"bootstrap.servers": piece.endpoints["bootstrap"], "log_level": 0})
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)


def create_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30) -> None:
    """Create ``topic`` (or accept that it exists) through the Admin API."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=timeout)
    try:
        futures[topic].result(timeout)
    except KafkaException as error:
        if error.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise
