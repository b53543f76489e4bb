"""``backfill``, ``replay`` and ``run``: settings from the derived flags, then the job runner
(:mod:`qis_beam.jobs`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from qis_beam import options as table
from qis_beam.cli.beamargs import beam_args as resolve_beam_args
from qis_beam.cli.beamargs import match_input
from qis_beam.cli.parser import UsageError, option_values


def settings(args: argparse.Namespace, command: str):
    """The run's Settings from its flags. Bounded runs judge ``future_event_time`` against
    one clock fixed at the start; a long-running stream reads the wall clock per record."""
    from qis_beam.signing import load_registry

    values = option_values(args, command)
    if values["--node-registry"]:
        try:
            values["--node-registry"] = load_registry(values["--node-registry"])
        except (OSError, ValueError) as error:
            raise UsageError(f"--node-registry: {error}") from None
    fixed_clock = command != table.RUN
    extra = {"validation.now_ms": int(time.time() * 1000) if fixed_clock else None}
    try:
        return table.settings_from(values, command, extra)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _print_dry_run(summary: dict) -> None:
    print(
        f"dry run: {summary['runner']} translated the job ({summary['job_type']}, "
        f"{summary['transforms']} transforms); nothing was submitted, read or written"
    )


def _print_outputs(summary: dict) -> None:
    balance = "balances" if summary["balanced"] else "DOES NOT BALANCE"
    dead = summary["dead_letters"]
    print(
        f"records_in={summary['records_in']} valid={summary['valid']} "
        f"duplicates={summary['duplicates']} dead_letters={dead['total']} "
        f"too_late={summary['too_late']} ({balance}); addresses={summary['addresses']} "
        f"windows={summary['windows']}; {summary['wall_time_s']:.1f}s on {summary['runner']}"
    )
    for name, path in summary["outputs"].items():
        print(f"  {name}: {path}")


def cmd_backfill(args, beam_args) -> int:
    from qis_beam.jobs import pipeline_options, run_job
    from qis_beam.pipelines.backfill import build_backfill
    from qis_beam.progress import Progress, wanted
    from qis_beam.runners.sizing import flink_backfill_parallelism

    explicit_parallelism = any(a.split("=")[0] == "--parallelism" for a in beam_args)
    beam_args = resolve_beam_args(args.profile, beam_args, streaming=False)
    files = match_input(args.input)
    run_settings = settings(args, table.BACKFILL)
    options = pipeline_options(beam_args, default_runner="FnApiRunner")
    input_bytes = sum(m.size_in_bytes for m in files)
    sizing = flink_backfill_parallelism(options, input_bytes, explicit_parallelism)
    if sizing:
        print(f"backfill: {sizing}", file=sys.stderr)
    # In-process runners (FnApiRunner by default) read in this process: the read step
    # reports to the bar; elsewhere the hook is simply not installed.
    with Progress(enabled=wanted(args.quiet)) as progress:
        progress.stage("backfill: read", total=input_bytes)
        summary = run_job(
            lambda p: build_backfill(p, args.input, args.output, run_settings, args.bigquery_table),
            args.output,
            options,
            store_url=args.store,
        )
    if summary.get("dry_run"):
        _print_dry_run(summary)
    else:
        _print_outputs(summary)
    return 0


def cmd_replay(args, beam_args) -> int:
    from qis_beam.jobs import run_replay
    from qis_beam.progress import Progress, wanted
    from qis_beam.replay import UnsupportedReplayRunner

    beam_args = resolve_beam_args(args.profile, beam_args, streaming=True)
    paths = [m.path for m in match_input(args.input)]
    run_settings = settings(args, table.REPLAY)
    try:
        with Progress(enabled=wanted(args.quiet)) as progress:
            summary, records = run_replay(paths, args.output, run_settings, beam_args, progress)
    except UnsupportedReplayRunner as error:
        raise UsageError(str(error)) from None
    _print_outputs(summary)
    panes = Counter(r["pane"]["timing"] for r in records if r["window_start_ms"] is not None)
    snapshots = sum(1 for r in records if r["window_start_ms"] is None)
    print(
        "  panes: "
        + ", ".join(f"{t}={panes.get(t, 0)}" for t in ("EARLY", "ON_TIME", "LATE"))
        + f"; all-time snapshots={snapshots}; too_late={summary['too_late']}"
    )
    return 0


def cmd_run(args, beam_args) -> int:
    from qis_beam.jobs import pipeline_options, run_streaming
    from qis_beam.pipelines.run import build_run

    beam_args = resolve_beam_args(args.profile, beam_args, streaming=True)
    source = _source(args)
    run_settings = settings(args, table.RUN)
    options = pipeline_options(beam_args, default_runner="DirectRunner", streaming=True)
    _refuse_a_bounded_run_on_flink(options, source)

    def submitted(state: str) -> None:
        print(f"submitted the streaming job; state {state}; outputs under {args.output}")

    result = run_streaming(
        lambda p: build_run(
            p, source, args.output, run_settings, args.bigquery_table, store_url=args.store
        ),
        options,
        wait=args.wait,
        on_submitted=submitted,
    )
    if result["dry_run"]:
        _print_dry_run(result)
    elif result["cancelled"]:
        print("qis-beam run: interrupted; the job was cancelled", file=sys.stderr)
        return 130
    return 0


def _refuse_a_bounded_run_on_flink(options, source) -> None:
    """``--kafka-stop-when-idle`` cannot end a job on the FlinkRunner without losing records.

    With checkpointing on, Beam's Flink runner keeps the ``Impulse`` that feeds the Kafka
    reader alive forever, so the job never finishes; its ``--shutdown_sources_after_idle_ms``
    times the Impulse, idle from the start, not the reader: after that long Flink ends the
    stream while a reader with a backlog has deferred the rest of it, which is never read,
    and what was read reaches the stateful steps behind an end-of-time watermark and is
    dropped (measured: a 20k-packet topic, 10 s, read 5,000 records). On Flink a Kafka job
    runs unbounded and is stopped (cancel, or stop with drain); bounded input is a backfill.
    """
    from qis_beam.jobs import is_flink

    if source.kind != "kafka" or source.kafka_stop_when_idle_ms is None:
        return
    if is_flink(options):
        raise UsageError(
            "--kafka-stop-when-idle cannot end a job on the FlinkRunner without losing "
            "records (Flink's idle-source shutdown ends the stream before the reader has "
            "read its backlog); run it unbounded and stop the job, or backfill a log"
        )


def _source(args):
    """The live source from ``run``'s flags, checked: each source needs its names, and a
    flag that the chosen Kafka reader would ignore is refused."""
    source = table.source_from(option_values(args, table.RUN))
    if source.kind == "kafka" and not (source.topic and source.bootstrap_servers):
        raise UsageError("--source kafka needs --input-topic and --bootstrap-servers")
    if source.kind == "pubsub":
        if not (source.topic or source.subscription):
            raise UsageError("--source pubsub needs --input-topic or --input-subscription")
        _check_pubsub_names(source.topic, source.subscription)
    from qis_beam.pipelines.run import kafka_reader

    reader = kafka_reader(source)
    if reader == "xlang" or source.kind != "kafka":
        native_only = {
            "--kafka-group-id": source.kafka_group_id,
            "--kafka-stop-when-idle": source.kafka_stop_when_idle_ms,
        }
        used = [flag for flag, value in native_only.items() if value is not None]
        if used:
            raise UsageError(f"{used[0]} needs --source kafka --kafka-reader native")
    else:
        if source.kafka_expansion_service:
            raise UsageError("--kafka-expansion-service needs --kafka-reader xlang")
        if source.kafka_timestamp_policy == "ProcessingTime":
            raise UsageError(
                "--kafka-reader native uses the record timestamps (CreateTime or LogAppendTime)"
            )
    return source


def _check_pubsub_names(topic: str | None, subscription: str | None) -> None:
    """Beam's own Pub/Sub name rules, checked before the pipeline is built."""
    from apache_beam.io.gcp.pubsub import parse_subscription, parse_topic

    for flag, name, parse in (
        ("--input-topic", topic, parse_topic),
        ("--input-subscription", subscription, parse_subscription),
    ):
        if name:
            try:
                parse(name)
            except ValueError as error:
                raise UsageError(f"{flag} {name}: {error}") from None
