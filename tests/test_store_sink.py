"""The store sink in pipelines: the streaming graph upserting every snapshot as it is
produced (BundleBasedDirectRunner, TestStream), retried bundles and re-runs, and
``backfill --store URL`` (FnApiRunner) on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from conftest import HOUR_MS, T0_MS, fnapi_options, make_record, node_key
from pg_local import fresh_database

from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.settings import Settings, StreamSettings, WindowSettings
from qis_beam.store import open_store
from qis_beam.tfrecords import write_record
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain, read_json_lines
from qis_beam.transforms.store_sink import WriteToStore
from qis_beam.validation import ValidationPolicy


def write_records(path: str, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)


# Every test here runs (or translates, for Dataflow) a whole pipeline.
pytestmark = pytest.mark.slow

MIN = 60_000
NOW = T0_MS + 100 * HOUR_MS


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/serving.db"
    return fresh_database(request.getfixturevalue("pg_server"))


def packet(i: int, event_ms: int):
    record = make_record(
        node_key(1 + i % 3),
        packet_id=i.to_bytes(16, "big"),
        event_time_ms=event_ms,
        emit_time_ms=event_ms,
    )
    return record, event_ms


def stream_into_store(tmp_path, script, store_url, settings):
    stream = TestStream().with_output_types(tuple[bytes, str])
    for kind, value in script:
        if kind == "add":
            stream.add_elements(
                [TimestampedValue((r, "test"), Timestamp(micros=ms * 1000)) for r, ms in value]
            )
        else:
            stream.advance_watermark_to(Timestamp(micros=value * 1000))
    last = max(ms for kind, value in script if kind == "add" for _, ms in value)
    stream.advance_watermark_to(
        Timestamp(micros=(last + settings.stream.state_ttl_ms + HOUR_MS) * 1000)
    )
    stream.advance_watermark_to_infinity()
    output = str(tmp_path / "out")
    options = PipelineOptions([], runner="BundleBasedDirectRunner", streaming=True)
    with beam.Pipeline(options=options) as p:
        build_streaming_graph(
            p | stream, output, settings, write=WriteJsonLinesOnDrain, store_url=store_url
        )
    return list(read_json_lines(output, "synthesis"))


def test_stream_upserts_snapshots_and_an_expired_address_restarts_forward(tmp_path, store_url):
    """The all-time state of an idle address expires; its next life restarts its pane index
    at 0. The store follows the new life (later snapshot time), not the old pane index."""
    settings = Settings(
        validation=ValidationPolicy(now_ms=NOW),
        windows=WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=HOUR_MS),
        stream=StreamSettings(emit_every_ms=10 * MIN, state_ttl_ms=2 * HOUR_MS),
    )
    script = []
    for i, minute in enumerate((1, 2, 12, 25, 26)):
        script += [("add", [packet(i, T0_MS + minute * MIN)]), ("wm", T0_MS + minute * MIN)]
    script += [("wm", T0_MS + m * MIN) for m in (30, 40, 60, 90, 120, 140, 150, 160)]
    script += [("add", [packet(10, T0_MS + 175 * MIN)]), ("wm", T0_MS + 180 * MIN)]
    script += [("wm", T0_MS + m * MIN) for m in (200, 250, 300, 330)]
    records = stream_into_store(tmp_path, script, store_url, settings)

    all_time = [r for r in records if r["window_start_ms"] is None]
    first_life = max(all_time, key=lambda r: r["pane"]["index"])
    assert first_life["n_packets"] == 5  # the pane-index rule would have kept this one
    second_life = [r for r in all_time if r["first_event_ms"] == T0_MS + 175 * MIN]
    assert second_life and second_life[-1]["pane"]["index"] < first_life["pane"]["index"]
    with open_store(store_url) as store:
        (address,) = store.addresses()
        latest = store.entry(address)
        assert latest.record == second_life[-1]
        assert latest.run_id.startswith("stream-")
        # each window's row is its last (accumulating) pane
        last_pane = {}
        for r in records:
            if r["window_start_ms"] is not None:
                held = last_pane.get(r["window_start_ms"])
                if held is None or r["pane"]["index"] > held["pane"]["index"]:
                    last_pane[r["window_start_ms"]] = r
        assert store.windows(address) == [last_pane[k] for k in sorted(last_pane)]
        expected = (store.latest(address), store.windows(address))

    # A retried bundle / restart from a checkpoint re-offers earlier snapshots: the sink
    # writes them again, in reverse, through the same transform; nothing moves backwards.
    options = PipelineOptions([], runner="BundleBasedDirectRunner")
    with beam.Pipeline(options=options) as p:
        p | beam.Create(records[::-1]) | WriteToStore(store_url, batch_size=3)
    with open_store(store_url) as store:
        assert (store.latest(address), store.windows(address)) == expected


def test_backfill_store_url_and_rerun(tmp_path, store_url, capsys):
    from qis_beam.cli import main

    records = []
    for i in range(9):
        t = T0_MS + (i % 3) * HOUR_MS + i * MIN
        records.append(
            make_record(
                node_key(1 + i % 3),
                packet_id=i.to_bytes(16, "big"),
                event_time_ms=t,
                emit_time_ms=t,
            )
        )
    (tmp_path / "in").mkdir()
    write_records(str(tmp_path / "in" / "packets-0.tfrecord"), records)
    argv = [
        "backfill",
        "--input",
        str(tmp_path / "in" / "*.tfrecord"),
        "--allow-unsigned",
        "--store",
        store_url,
        "--runner",
        "FnApiRunner",
    ]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["outputs"]["store"] == store_url
    assert not (tmp_path / "out" / "intelligence.db").exists()  # the URL replaces the default
    synthesis = list(read_json_lines(str(tmp_path / "out"), "synthesis"))
    with open_store(store_url) as store:
        (address,) = store.addresses()
        first = (store.entry(address), store.windows(address))
    assert first[0].record == next(r for r in synthesis if r["window_start_ms"] is None)
    assert first[0].run_id.startswith("backfill-") and len(first[1]) == 3
    # a re-run of the same input leaves the store as it was (rows untouched)
    assert main([*argv, "--output", str(tmp_path / "out2")]) == 0
    with open_store(store_url) as store:
        assert (store.entry(address), store.windows(address)) == first
    capsys.readouterr()
    assert main(["query", "--store", store_url, "--address", address]) == 0
    assert json.loads(capsys.readouterr().out) == first[0].record


def test_backfill_default_store_is_unchanged(tmp_path):
    """Without --store, DIR/intelligence.db as before (read through open_store and the
    historical IntelligenceStore)."""
    from qis_beam.jobs import run_job
    from qis_beam.pipelines.backfill import build_backfill
    from qis_beam.store import IntelligenceStore

    t = T0_MS + MIN
    record = make_record(node_key(1), packet_id=bytes(16), event_time_ms=t, emit_time_ms=t)
    (tmp_path / "in").mkdir()
    write_records(str(tmp_path / "in" / "p.tfrecord"), [record])
    out = str(tmp_path / "out")
    settings = Settings(validation=ValidationPolicy(now_ms=NOW, allow_unsigned=False))
    summary = run_job(
        lambda p: build_backfill(p, str(tmp_path / "in" / "*.tfrecord"), out, settings),
        out,
        fnapi_options(),
    )
    assert summary["outputs"]["store"] == f"{out}/intelligence.db"
    with (
        IntelligenceStore(f"{out}/intelligence.db") as a,
        open_store(f"sqlite://{out}/intelligence.db") as b,
    ):
        (address,) = a.addresses()
        assert a.latest(address) == b.latest(address) and a.latest(address)["n_packets"] == 1


def test_run_store_flag_wires_a_stably_labelled_sink(capsys, unrun_pipeline):
    """`qis-beam run --store URL` adds WriteSynthesisToStore to the streaming job (Dataflow
    dry run: translated offline; nothing connects to the store)."""
    from apache_beam.options.pipeline_options import PipelineOptions as Options

    from qis_beam.cli import main
    from qis_beam.pipelines.run import SourceSettings, build_run

    dry = [
        "--runner",
        "DataflowRunner",
        "--dry_run",
        "--project",
        "qis-dry-run",
        "--region",
        "us-central1",
        "--temp_location",
        "gs://qis-dry-run/tmp",
    ]
    topic = "projects/qis-dry-run/topics/qis-packets"
    url = "postgresql://qis@127.0.0.1:1/qis"
    args = ["run", "--input-topic", topic, "--output", "gs://qis-dry-run/out", "--store", url]
    assert main([*args, *dry]) == 0
    assert "translated the job (JOB_TYPE_STREAMING" in capsys.readouterr().out
    pipeline = unrun_pipeline(Options(["--streaming"]))
    source = SourceSettings(kind="pubsub", topic=topic)
    build_run(pipeline, source, "gs://qis-dry-run/out", Settings(), store_url=url)
    names = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
    assert "WriteSynthesisToStore/UpsertSnapshots" in names
