"""The ``qis-beam`` command line (spec section 8).

Beam pipeline options (``--runner``, ``--project``, ...) pass through to the pipeline; any
other unknown flag is an error. Bad arguments print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from qis_beam.beam_internals import UnsupportedBeamError
from qis_beam.durations import parse_duration_ms

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class UsageError(Exception):
    """A bad command-line argument: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # never swallow a Beam option by prefix
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one clear line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def _duration(text: str) -> int:
    try:
        return parse_duration_ms(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]: {text!r}")
    return value


def _transport_url(text: str):
    from qis_beam.transports import parse_transport_url

    try:
        return parse_transport_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _rate(text: str) -> float:
    from qis_beam.transports import parse_rate

    try:
        return parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_STORE_HELP = "store URL: sqlite:///PATH (or a path) or postgresql://USER@HOST:PORT/DB"


def _store_url(text: str) -> str:
    from qis_beam.store import store_kind
    from qis_beam.store.url import sqlite_path

    try:
        if store_kind(text) == "sqlite":
            sqlite_path(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_profile(p: argparse.ArgumentParser) -> None:
    from qis_beam.runners.profiles import PROFILE_NAMES

    p.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        help="runner profile (runners/profiles.py); explicit Beam options override it",
    )


def _add_pipeline_options(p: argparse.ArgumentParser, streaming: bool) -> None:
    _add_profile(p)
    g = p.add_argument_group("ingestion (spec section 4)")
    g.add_argument("--node-registry", help="file of hex Ed25519 public keys allowed to send")
    g.add_argument(
        "--allow-unsigned", action="store_true", help="accept envelopes without signature"
    )
    g.add_argument("--max-packet-bytes", type=_positive_int, default=1024)
    g.add_argument("--max-clock-skew", type=_duration, default="5m")
    g.add_argument("--dedupe-ttl", type=_duration, default="24h", help="streaming dedupe horizon")
    g.add_argument(
        "--dedupe-shards",
        type=_positive_int,
        default=1,
        help="batch dedupe: at least this many packet_id shards (automatic: >= 512, by input size)",
    )
    g = p.add_argument_group("synthesis (spec sections 5-6)")
    g.add_argument("--window", type=_duration, default="1h", help="event-time window size")
    g.add_argument(
        "--window-period", type=_duration, help="sliding windows: period (divides --window)"
    )
    g.add_argument("--allowed-lateness", type=_duration, default="1h")
    g.add_argument(
        "--early-firing-count", type=_non_negative_int, default=0 if not streaming else 100
    )
    g.add_argument(
        "--early-firing-delay",
        type=_duration,
        default=None,
        help="streaming runners only: processing-time early panes",
    )
    g.add_argument("--min-support", type=_positive_int, default=3)
    g.add_argument("--top-k", type=_positive_int, default=10)
    g.add_argument("--min-nodes", type=_non_negative_int, default=1)
    g.add_argument("--emit-every", type=_duration, default="10m", help="all-time snapshot period")
    g.add_argument("--state-ttl", type=_duration, default="7d", help="forget idle addresses")
    g.add_argument("--hot-key-fanout", type=_non_negative_int, default=0)
    g.add_argument("--read-batch-size", type=_positive_int, default=50_000, help=argparse.SUPPRESS)


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="qis-beam",
        description="Route and synthesise ML training outcomes by semantic address on Apache Beam.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("simulate", help="write a synthetic swarm's signed packet logs")
    p.add_argument("--out", help="output directory (with --live: nodes.txt and truth.json)")
    p.add_argument("--nodes", type=_positive_int, default=200)
    p.add_argument("--addresses", type=_positive_int, default=20)
    p.add_argument("--approaches", type=_positive_int, default=12)
    p.add_argument("--packets", type=_positive_int, help="valid packets (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duplicate-fraction", type=_fraction, default=0.01)
    p.add_argument("--malformed-fraction", type=_fraction, default=0.005)
    p.add_argument("--late-fraction", type=_fraction, default=0.02)
    p.add_argument("--shards", type=_positive_int, default=4)
    p.add_argument("--unsigned", action="store_true", help="write unsigned envelopes")
    p.add_argument(
        "--address-skew", type=float, default=0.0, help="zipf exponent of packets per address"
    )
    g = p.add_argument_group("live mode (qis_beam/sim_live.py)")
    g.add_argument("--live", action="store_true", help="send with current event times")
    g.add_argument("--to", type=_transport_url, help="kafka://H:P/T, pubsub://projects/P/topics/T")
    g.add_argument("--rate", type=_rate, default="500/s", help="records per time, e.g. 500/s")
    g.add_argument("--duration", type=_duration, help="stop after this long (default: Ctrl-C)")

    p = sub.add_parser("publish", help="send an existing packet log to a live transport")
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs")
    p.add_argument("--to", required=True, type=_transport_url, help="transport URL")
    p.add_argument("--rate", type=_rate, help="records per time (default: as fast as possible)")

    p = sub.add_parser("backfill", help="batch synthesis of packet logs (FnApiRunner by default)")
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs (local or gs://)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--bigquery-table", help="also append synthesis rows to PROJECT:DATASET.TABLE")
    p.add_argument(
        "--store", type=_store_url, help=_STORE_HELP + " (default OUTPUT/intelligence.db)"
    )
    _add_pipeline_options(p, streaming=False)

    p = sub.add_parser(
        "replay",
        help="replay packet logs as a stream (TestStream, BundleBasedDirectRunner; not Prism)",
    )
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--watermark-delay",
        type=_duration,
        default="1m",
        help="the watermark trails the latest emit time by this much",
    )
    _add_pipeline_options(p, streaming=True)

    p = sub.add_parser(
        "run", help="the production streaming job (Kafka on Flink, Pub/Sub on Dataflow)"
    )
    p.add_argument("--source", choices=["kafka", "pubsub"], default="pubsub")
    p.add_argument("--input-topic", help="Kafka topic, or Pub/Sub projects/P/topics/T")
    p.add_argument("--input-subscription", help="Pub/Sub projects/P/subscriptions/S")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers host:port[,...]")
    p.add_argument(
        "--kafka-expansion-service",
        help="host:port of a running Java IO expansion service (default: Beam starts one, "
        "which needs Maven Central)",
    )
    p.add_argument(
        "--kafka-timestamp-policy",
        default="CreateTime",
        choices=["ProcessingTime", "CreateTime", "LogAppendTime"],
    )
    p.add_argument(
        "--kafka-reader",
        choices=["native", "xlang"],
        help="native: Python reader, any runner (default without --kafka-expansion-service); "
        "xlang: Beam's ReadFromKafka (Java expansion service; Flink/Dataflow)",
    )
    p.add_argument("--kafka-group-id", help="native: commit offsets to this group, resume there")
    p.add_argument(
        "--kafka-watermark-delay",
        type=_duration,
        default="1m",
        help="native: the watermark trails the newest record timestamp by this much",
    )
    p.add_argument(
        "--kafka-stop-when-idle",
        type=_duration,
        help="native: end the job once the topic is drained and idle this long (tests)",
    )
    p.add_argument("--timestamp-attribute", help="Pub/Sub attribute holding event time (ms)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument(
        "--flush-every",
        type=_duration,
        default="5m",
        help="period of the rolled output files: one file per output, shard and period",
    )
    p.add_argument(
        "--output-shards",
        type=_positive_int,
        default=1,
        help="files per output and period, written in parallel (raise it on a busy cluster)",
    )
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("--bigquery-table", help="also append synthesis rows to PROJECT:DATASET.TABLE")
    p.add_argument("--store", type=_store_url, help=_STORE_HELP + ": upsert every snapshot")
    _add_pipeline_options(p, streaming=True)

    p = sub.add_parser("query", help="print the latest synthesis for an address")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=_store_url, help=_STORE_HELP)
    where.add_argument("--server", help="HOST:PORT of a `qis-beam serve`")
    p.add_argument("--token-file", help="with --server: file holding the bearer token")
    p.add_argument("--tls-root-cert", help="with --server: PEM root certificate (turns TLS on)")
    p.add_argument("--timeout", type=float, default=10.0, help="with --server: seconds")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", help="hex semantic address")
    target.add_argument("--template", help="template id; with --context computes the address")
    p.add_argument("--context", nargs="+", metavar="K=V", default=[], help="problem context pairs")
    p.add_argument("--window", action="store_true", help="list the address's windows instead")

    p = sub.add_parser("serve", help="the gRPC query service over a store (qis.v1)")
    p.add_argument("--store", required=True, type=_store_url, help=_STORE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1 only)")
    p.add_argument("--port", type=_non_negative_int, default=50051, help="0: any free port")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--token-file", help="bearer tokens, one a line: every call needs one")
    p.add_argument("--workers", type=_positive_int, default=8, help="concurrent calls")
    p.add_argument(
        "--processes", type=_positive_int, default=1, help="server processes sharing the port"
    )

    p = sub.add_parser("demo", help="simulate a swarm, backfill it and query it (the main job)")
    p.add_argument("--out", default="qis-demo", help="working directory (default ./qis-demo)")
    p.add_argument("--packets", type=_positive_int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    _add_profile(p)

    p = sub.add_parser("report", help="an offline HTML report with figures of a run's outputs")
    p.add_argument("--output", required=True, help="a backfill/replay --output folder (local)")
    p.add_argument("--truth", help="the simulator's truth.json: recommended vs true best")
    p.add_argument("--to", help="report folder (default OUTPUT/report)")
    p.add_argument("--max-addresses", type=_positive_int, help="addresses drawn in detail")

    from qis_beam.stack.cli import add_stack_parser  # the local engines (qis_beam/stack)

    add_stack_parser(sub)
    return parser


def _settings(args: argparse.Namespace, fixed_clock: bool = True):
    from qis_beam.settings import Settings, StreamSettings, WindowSettings
    from qis_beam.signing import load_registry
    from qis_beam.synthesis import SynthesisParams
    from qis_beam.validation import ValidationPolicy

    registry = None
    if args.node_registry:
        try:
            registry = load_registry(args.node_registry)
        except (OSError, ValueError) as error:
            raise UsageError(f"--node-registry: {error}") from None
    import time

    try:
        windows = WindowSettings(
            size_ms=args.window,
            period_ms=args.window_period,
            allowed_lateness_ms=args.allowed_lateness,
            early_firing_count=args.early_firing_count,
            early_firing_delay_ms=args.early_firing_delay or 0,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    return Settings(
        validation=ValidationPolicy(
            max_packet_bytes=args.max_packet_bytes,
            allow_unsigned=args.allow_unsigned,
            registry=registry,
            max_clock_skew_ms=args.max_clock_skew,
            # Bounded runs judge future_event_time against one clock fixed at the start;
            # a long-running stream reads the wall clock per record.
            now_ms=int(time.time() * 1000) if fixed_clock else None,
        ),
        synthesis=SynthesisParams(
            min_support=args.min_support, top_k=args.top_k, min_nodes=args.min_nodes
        ),
        windows=windows,
        stream=StreamSettings(
            emit_every_ms=args.emit_every,
            state_ttl_ms=args.state_ttl,
            dedupe_ttl_ms=args.dedupe_ttl,
            watermark_delay_ms=getattr(args, "watermark_delay", 60_000),
        ),
        dedupe_shards=args.dedupe_shards,
        read_batch_size=args.read_batch_size,
        hot_key_fanout=args.hot_key_fanout,
    )


# Beam options that take a value but are written as switches (Beam's own parser would
# reject ``--dry_run --project P``: "expected one argument").
_SWITCH_LIKE_OPTIONS = ("--dry_run",)


def _switches_as_values(beam_args: Sequence[str]) -> list[str]:
    args = list(beam_args)
    for i, arg in enumerate(args):
        at_end_or_option = i + 1 == len(args) or args[i + 1].startswith("-")
        if arg in _SWITCH_LIKE_OPTIONS and at_end_or_option:
            args[i] = f"{arg}=True"
    return args


def _beam_args(args: argparse.Namespace, beam_args: Sequence[str], streaming: bool) -> list[str]:
    """Apply ``--profile`` (explicit Beam options win) and reject anything not a Beam option."""
    from qis_beam.runners.profiles import (
        merge_args,
        missing_options,
        profile_args,
        unrecognized_args,
    )

    merged = _switches_as_values(beam_args)
    profile = getattr(args, "profile", None)
    try:
        if profile:
            merged = merge_args(profile_args(profile, streaming), beam_args)
        unknown = unrecognized_args(merged)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    if profile:
        missing = missing_options(profile, merged)
        if missing:
            flags = ", ".join(f"--{m}" for m in missing)
            raise UsageError(f"--profile {profile} needs {flags}")
    _check_dataflow_options(merged)
    return merged


def _check_dataflow_options(beam_args: list[str]) -> None:
    """Beam's offline checks of a Dataflow job's cloud options, run up front: a bad project or
    bucket is one line and exit 2, not a traceback once the pipeline is built. A dry run
    with no valid bucket is refused: Beam would try to create a default bucket online."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    from qis_beam.jobs import is_dataflow, is_dry_run

    options = PipelineOptions(beam_args)
    if not is_dataflow(options):
        return
    cloud = options.view_as(GoogleCloudOptions)
    validator = PipelineOptionsValidator(options, DataflowRunner())
    errors = list(validator.validate_cloud_options(cloud))
    if is_dry_run(options):
        location_errors = [
            validator.validate_gcs_path(cloud, name)
            for name in ("temp_location", "staging_location")
        ]
        if all(location_errors):
            errors.append(f"{location_errors[0][0]} (a dry run cannot create a default bucket)")
    if errors:
        raise UsageError("; ".join(" ".join(error.split()) for error in errors))


def _match_input(pattern: str) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # noqa: BLE001 - any filesystem failure is a bad --input
        raise UsageError(f"--input {pattern}: {error}") from None
    if not matched:
        raise UsageError(f"--input {pattern}: no files match")
    return sorted(m.path for m in matched)


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


def cmd_simulate(args, beam_args) -> int:
    if beam_args:
        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    from qis_beam.simulate import SwarmConfig, simulate

    if args.live and not args.to:
        raise UsageError("--live needs --to URL")
    if not args.live and (args.to or args.duration):
        raise UsageError("--to and --duration need --live")
    if not args.live and not args.out:
        raise UsageError("the following arguments are required: --out")
    try:
        config = SwarmConfig(
            nodes=args.nodes,
            addresses=args.addresses,
            approaches=args.approaches,
            packets=args.packets or 100_000,
            seed=args.seed,
            duplicate_fraction=args.duplicate_fraction,
            malformed_fraction=args.malformed_fraction,
            late_fraction=args.late_fraction,
            shards=args.shards,
            signed=not args.unsigned,
            address_skew=args.address_skew,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.live:
        from qis_beam.sim_live import simulate_live_command

        return simulate_live_command(config, args)

    def progress(done: int, total: int) -> None:
        if total >= 50_000:
            print(f"\r  simulated {done}/{total} records", end="", file=sys.stderr, flush=True)

    report = simulate(args.out, config, progress=progress)
    if config.packets >= 50_000:
        print(file=sys.stderr)
    print(
        f"wrote {report.records} records ({report.valid} valid, {report.duplicates} duplicates, "
        f"{report.conflicting} conflicting, {sum(report.malformed_by_reason.values())} malformed) "
        f"to {args.out}"
    )
    for path in report.files:
        print(f"  {path}")
    return 0


def cmd_publish(args, beam_args) -> int:
    if beam_args:
        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    from qis_beam.sim_live import publish_command

    return publish_command(_match_input(args.input), args)


def cmd_backfill(args, beam_args) -> int:
    from qis_beam.jobs import pipeline_options, run_job
    from qis_beam.pipelines.backfill import build_backfill

    beam_args = _beam_args(args, beam_args, streaming=False)
    _match_input(args.input)
    settings = _settings(args)
    options = pipeline_options(beam_args, default_runner="FnApiRunner")
    summary = run_job(
        lambda p: build_backfill(p, args.input, args.output, settings, args.bigquery_table),
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
    from collections import Counter

    from qis_beam.jobs import run_replay
    from qis_beam.replay import UnsupportedReplayRunner

    beam_args = _beam_args(args, beam_args, streaming=True)
    paths = _match_input(args.input)
    try:
        summary, records = run_replay(paths, args.output, _settings(args), beam_args)
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
    from qis_beam.jobs import is_dry_run, pipeline_options, translate_only
    from qis_beam.pipelines.run import SourceSettings, build_run

    beam_args = _beam_args(args, beam_args, streaming=True)
    if args.source == "kafka" and not (args.input_topic and args.bootstrap_servers):
        raise UsageError("--source kafka needs --input-topic and --bootstrap-servers")
    if args.source == "pubsub" and not (args.input_topic or args.input_subscription):
        raise UsageError("--source pubsub needs --input-topic or --input-subscription")
    if args.source == "pubsub":
        _check_pubsub_names(args.input_topic, args.input_subscription)
    source = SourceSettings(
        kind=args.source,
        topic=args.input_topic,
        subscription=args.input_subscription,
        bootstrap_servers=args.bootstrap_servers,
        kafka_timestamp_policy=args.kafka_timestamp_policy,
        kafka_expansion_service=args.kafka_expansion_service,
        timestamp_attribute=args.timestamp_attribute,
        flush_seconds=max(1, args.flush_every // 1000),
        output_shards=args.output_shards,
        **_native_kafka_options(args),
    )
    settings = _settings(args, fixed_clock=False)
    import apache_beam as beam

    options = pipeline_options(beam_args, default_runner="DirectRunner", streaming=True)
    job = (source, args.output, settings, args.bigquery_table)
    if is_dry_run(options):
        _print_dry_run(translate_only(lambda p: build_run(p, *job), options))
        return 0
    pipeline = beam.Pipeline(options=options)
    build_run(pipeline, *job, store_url=args.store)
    result = pipeline.run()
    print(f"submitted the streaming job; state {result.state}; outputs under {args.output}")
    if args.wait:
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:
            # A local job on an unbounded source never ends by itself: Ctrl-C cancels it
            # (output files flushed so far stay; see WriteJsonLinesContinuously).
            result.cancel()
            print("qis-beam run: interrupted; the job was cancelled", file=sys.stderr)
            return 130
    return 0


def _native_kafka_options(args) -> dict:
    """SourceSettings fields of the native Kafka reader; flags that the chosen reader would
    ignore are refused."""
    reader = args.kafka_reader or ("xlang" if args.kafka_expansion_service else "native")
    native_only = {
        "--kafka-group-id": args.kafka_group_id,
        "--kafka-stop-when-idle": args.kafka_stop_when_idle,
    }
    if reader == "xlang" or args.source != "kafka":
        used = [flag for flag, value in native_only.items() if value is not None]
        if used:
            raise UsageError(f"{used[0]} needs --source kafka --kafka-reader native")
        return {"kafka_reader": reader}
    if args.kafka_expansion_service:
        raise UsageError("--kafka-expansion-service needs --kafka-reader xlang")
    if args.kafka_timestamp_policy == "ProcessingTime":
        raise UsageError(
            "--kafka-reader native uses the record timestamps (CreateTime or LogAppendTime)"
        )
    return {
        "kafka_reader": reader,
        "kafka_group_id": args.kafka_group_id,
        "kafka_watermark_delay_ms": args.kafka_watermark_delay,
        "kafka_stop_when_idle_s": (
            None if args.kafka_stop_when_idle is None else args.kafka_stop_when_idle / 1000
        ),
    }


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


def _query_address(args) -> str:
    if args.address:
        address = args.address.lower()
        try:
            if len(bytes.fromhex(address)) != 32:
                raise ValueError
        except ValueError:
            raise UsageError(f"--address must be 64 hex characters: {args.address!r}") from None
        return address
    from qis_beam.address import parse_context_pairs, semantic_address

    if not args.context:
        raise UsageError("--template needs --context k=v ...")
    try:
        return semantic_address(args.template, parse_context_pairs(args.context)).hex()
    except ValueError as error:
        raise UsageError(str(error)) from None


def cmd_query(args, beam_args) -> int:
    if beam_args:
        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    from qis_beam.store import StoreNotFound, StoreUnavailable, open_store

    address = _query_address(args)
    if args.server:
        from qis_beam.service.commands import query_server

        return query_server(args, address)
    try:
        with open_store(args.store) as store:
            result = store.windows(address) if args.window else store.latest(address)
    except StoreNotFound as error:
        print(f"qis-beam query: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except StoreUnavailable as error:
        print(f"qis-beam query: {error}", file=sys.stderr)
        return 1
    if not result:
        print(f"qis-beam query: no synthesis for address {address}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(json.dumps(result, indent=2))
    return 0


def cmd_serve(args, beam_args) -> int:
    if beam_args:
        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    from qis_beam.service.commands import serve, serve_config

    try:
        config = serve_config(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return serve(args, config)


def cmd_demo(args, beam_args) -> int:
    from qis_beam.demo import run_demo

    beam_args = _beam_args(args, beam_args, streaming=False)
    return run_demo(args.out, packets=args.packets, seed=args.seed, beam_args=beam_args)


def cmd_report(args, beam_args) -> int:
    if beam_args:
        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    from qis_beam.report import BadTruth, NoOutputs, write_report

    try:
        limit = {"max_addresses": args.max_addresses} if args.max_addresses else {}
        path = write_report(args.output, args.to, args.truth, **limit)
    except BadTruth as error:
        raise UsageError(str(error)) from None
    except NoOutputs as error:
        print(f"qis-beam report: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(path)
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "publish": cmd_publish,
    "backfill": cmd_backfill,
    "replay": cmd_replay,
    "run": cmd_run,
    "query": cmd_query,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "report": cmd_report,
    "stack": lambda args, beam_args: _cmd_stack(args, beam_args),
}


def _cmd_stack(args, beam_args) -> int:
    from qis_beam.stack.cli import cmd_stack

    return cmd_stack(args, beam_args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args, beam_args = _build_parser().parse_known_args(argv)
        return COMMANDS[args.command](args, beam_args)
    except UsageError as error:
        message = str(error)
        if args is not None and not message.startswith("qis-beam"):
            message = f"qis-beam {args.command}: {message}"
        print(message, file=sys.stderr)
        return EXIT_USAGE
    except UnsupportedBeamError as error:  # an environment problem, not a usage error
        print(f"qis-beam {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
