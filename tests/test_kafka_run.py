"""``qis-beam run --source kafka`` on Prism with the native Kafka reader, against a real broker.

The slow tests run the scenario of tests/kafka_helpers.py (shared with the Flink tests): a
generated swarm plus bad records published to a 3-partition topic in two phases, the
streaming job (PrismRunner, ``--kafka-reader native``) in a subprocess until the topic is
drained and idle, compared with a FnApiRunner backfill of exactly the published records.
The fast tests cover the reader's offset tracker, watermark rules and the CLI's flag checks.
"""

from __future__ import annotations

import kafka_helpers
import pytest

from qis_beam.cli import main
from qis_beam.transforms.kafka_read import (
    END,
    TopicOffsetsTracker,
    TopicWatermark,
    _ReadTopicFn,
    topic_watermark,
    watermark_after_records,
    watermark_when_idle,
)

HOUR_MS = 3_600_000

# --- the reader's building blocks (fast) ----------------------------------------------------


def test_tracker_claims_per_partition_and_checkpoints_where_reading_stands():
    tracker = TopicOffsetsTracker(((0, 5, END), (1, 0, END)))
    assert not tracker.is_bounded()
    assert tracker.try_claim((0, 5)) and tracker.try_claim((0, 9))  # offset gaps are fine
    assert tracker.try_claim((1, 0))
    with pytest.raises(ValueError):
        tracker.try_claim((0, 9))  # not strictly increasing
    assert tracker.try_split(0.5) is None  # fractional splits of [pos, END) are refused
    primary, residual = tracker.try_split(0)
    assert primary == ((0, 5, 10), (1, 0, 1))
    assert residual == ((0, 10, END), (1, 1, END))
    tracker.check_done()  # the primary is fully claimed
    assert not tracker.try_claim((0, 10))  # beyond the primary: the residual owns it


def test_tracker_is_done_only_when_every_range_is_claimed():
    tracker = TopicOffsetsTracker(((0, 0, 3), (1, 0, 2)))
    assert tracker.is_bounded()
    for offset in range(3):
        assert tracker.try_claim((0, offset))
    with pytest.raises(ValueError, match="not fully claimed"):
        tracker.check_done()
    assert tracker.try_claim((1, 1))  # claiming a range's last position ends it
    tracker.check_done()


def test_watermark_trails_records_is_capped_by_the_clock_and_idles_forward():
    now = 10 * HOUR_MS
    assert watermark_after_records(None, now - HOUR_MS, 60_000, now) == now - HOUR_MS - 60_000
    # a forged far-future record timestamp cannot push the watermark past the clock
    assert watermark_after_records(None, now + 100 * HOUR_MS, 60_000, now) == now - 60_000
    # monotonic: an older record never moves it back
    assert watermark_after_records(now - 1000, now - HOUR_MS, 0, now) == now - 1000
    assert watermark_when_idle(now - HOUR_MS, 60_000, now) == now - 60_000
    assert watermark_when_idle(now, 60_000, now) == now
    # the topic's watermark is the minimum; a partition without one holds it back
    assert topic_watermark({0: 5, 1: 3}, [0, 1]) == 3
    assert topic_watermark({0: 5}, [0, 1]) is None
    assert topic_watermark({0: 5, 1: 3}, [0]) == 5  # exhausted partitions do not count


class _Message:
    def __init__(self, partition, offset, ts_ms):
        self._p, self._o, self._ts = partition, offset, ts_ms

    def error(self):
        return None

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return 1, self._ts  # TIMESTAMP_CREATE_TIME

    def value(self):
        return b"r"


class _BusyPartitionZero:
    """A consumer whose partition 0 always has more records and whose partition 1 is empty."""

    def __init__(self, now_ms):
        self.next_offset, self.now_ms = 0, now_ms

    def consume(self, num_messages, timeout):
        batch = [_Message(0, self.next_offset + i, self.now_ms) for i in range(num_messages)]
        self.next_offset += num_messages
        return batch


class _TrackerView:
    def __init__(self, ranges):
        self.ranges, self.deferred = ranges, 0

    def current_restriction(self):
        return self.ranges

    def try_claim(self, position):
        return True

    def defer_remainder(self, delay=None):
        self.deferred += 1


def test_an_empty_partition_does_not_stall_the_watermark_under_steady_traffic():
    """Every bundle stops at its record cap (traffic never pauses on partition 0); the
    caught-up, empty partition 1 must still let the topic's watermark advance."""
    from qis_beam.transforms.kafka_tracking import TrackerAccess, wall_ms

    options = {
        "watermark_delay_ms": 5_000,
        "poll_interval_s": 0.01,
        "max_bundle_records": 50,
        "max_bundle_seconds": 10.0,
        "stop_when_idle_s": None,
        "metadata_timeout_s": 1.0,
        "max_records_per_partition": None,
    }
    fn = _ReadTopicFn("127.0.0.1:1", None, {}, options)
    fn.setup()
    consumer = _BusyPartitionZero(wall_ms())
    fn._reader = lambda topic, tracker: [consumer, {0: 0, 1: 0}]
    fn._high_offsets = lambda consumer, topic, partitions: {p: 0 for p in partitions}
    view = _TrackerView(((0, 0, END), (1, 0, END)))
    watermark = TopicWatermark(({}, None), options["watermark_delay_ms"])
    records = list(fn.read(("t", ((0, 0), (1, 0))), TrackerAccess(view), watermark))
    assert len(records) == 50 and view.deferred == 1  # stopped for the cap, more waiting
    assert watermark.current_watermark() is not None
    assert watermark.current_watermark().micros // 1000 >= consumer.now_ms - 5_000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kafka-reader", "xlang", "--kafka-stop-when-idle", "5s"], "--kafka-stop-when-idle"),
        (["--kafka-expansion-service", "localhost:1", "--kafka-reader", "native"], "xlang"),
        (["--kafka-timestamp-policy", "ProcessingTime"], "record timestamps"),
        (["--kafka-stop-when-idle", "soon"], "--kafka-stop-when-idle"),
    ],
)
def test_run_refuses_flags_the_kafka_reader_would_ignore(extra, message, capsys, tmp_path):
    args = ["run", "--source", "kafka", "--input-topic", "t", "--bootstrap-servers", "h:1"]
    code = main([*args, "--output", str(tmp_path), "--runner", "PrismRunner", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- end to end on a broker (slow): the scenario of tests/kafka_helpers.py on Prism ------


@pytest.fixture(scope="module")
def kafka_run(kafka_bootstrap, prism_path, postgres_url, tmp_path_factory):
    """Two-phase publish, a native-reader run on Prism writing its snapshots into PostgreSQL,
    and a backfill of the same records."""
    from pg_local import fresh_database

    scenario = kafka_helpers.prepare(tmp_path_factory.mktemp("kafka-run"), kafka_bootstrap)
    runner_args = [
        "--runner",
        "PrismRunner",
        f"--prism_location={prism_path}",
        # apache/beam#35771: a split stateful bundle can run one key twice and lose a write.
        "--experiments=prism_disable_sdf_split",
    ]
    run = kafka_helpers.two_phase_run(scenario, fresh_database(postgres_url), runner_args)
    kafka_helpers.backfill(scenario)
    return run


@pytest.mark.slow
def test_kafka_run_on_prism_equals_a_backfill_of_the_same_packets(kafka_run):
    kafka_helpers.check_stream_equals_backfill(kafka_run)


@pytest.mark.slow
def test_kafka_run_all_time_snapshots_equal_the_backfill(kafka_run):
    kafka_helpers.check_all_time_snapshots(kafka_run)


@pytest.mark.slow
def test_the_stream_served_over_grpc_answers_what_the_backfill_computed(kafka_run):
    """The loop closed: Kafka -> run on Prism -> PostgreSQL (upserted while streaming) ->
    qis-beam serve -> the node's client; every address's answer equals the backfill."""
    assert kafka_run["returncode"] == 0, kafka_run["log"][-3000:]
    kafka_helpers.check_served_answers(kafka_run)
