"""The ``qis-beam`` argument parser; the pipeline flags are derived from :mod:`qis_beam.options`.

Beam pipeline options (``--runner``, ``--project``, ...) are left unparsed and pass through;
a pipeline flag of another command is refused here (it must not reach Beam), and any other
unknown flag is refused by the Beam check of :mod:`qis_beam.cli.beamargs`.
"""

from __future__ import annotations

import argparse

from qis_beam import options as table
from qis_beam.cli import argtypes as types

EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class UsageError(Exception):
    """A bad command-line argument: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # never swallow a Beam option by prefix
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one clear line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def add_profile(p: argparse.ArgumentParser) -> None:
    from qis_beam.runners.profiles import PROFILE_NAMES

    p.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        help="runner profile (runners/profiles.py); explicit Beam options override it",
    )


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quiet", action="store_true", help="no progress on stderr (it is off unless a terminal)"
    )


def add_pipeline_options(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command`` from the option table, defaults read from the dataclasses."""
    groups = {}
    for option in table.options_for(command):
        if option.group not in groups:
            groups[option.group] = p.add_argument_group(option.group)
        value = table.default(option, command)
        text = table.help_text(option).replace("%", "%%")
        if value is not None and option.kind != "switch":
            text += f" (default {types.render(option.kind, value)})"
        kwargs = {"dest": option.dest, "default": value}
        kwargs["help"] = argparse.SUPPRESS if option.hidden else text
        if option.kind == "switch":
            if value:
                raise AssertionError(f"{option.flag}: a switch defaults to off")
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = types.BY_KIND[option.kind]
            kwargs["metavar"] = types.METAVARS.get(option.kind)
            if option.choices:
                kwargs["choices"] = option.choices
        groups[option.group].add_argument(option.flag, **kwargs)


def option_values(args: argparse.Namespace, command: str) -> dict:
    """``{flag: parsed value}`` of the table's flags of ``command``."""
    return {option.flag: getattr(args, option.dest) for option in table.options_for(command)}


def refuse_foreign(command: str, unknown: list[str]) -> None:
    """A pipeline flag that ``command`` does not use is a usage error, not a Beam option."""
    found = table.foreign((arg for arg in unknown if arg.startswith("--")), command)
    if found:
        flag, commands = found
        users = " and ".join(sorted(commands))
        raise UsageError(f"{flag} is an option of {users} only; {command} does not use it")


def build_parser() -> Parser:
    parser = Parser(
        prog="qis-beam",
        description="Route and synthesise ML training outcomes by semantic address on Apache Beam.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("simulate", help="write a synthetic swarm's signed packet logs")
    p.add_argument("--out", help="output directory (with --live: nodes.txt and truth.json)")
    p.add_argument("--nodes", type=types.positive_int, default=200)
    p.add_argument("--addresses", type=types.positive_int, default=20)
    p.add_argument("--approaches", type=types.positive_int, default=12)
    p.add_argument("--packets", type=types.positive_int, help="valid packets (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duplicate-fraction", type=types.fraction, default=0.01)
    p.add_argument("--malformed-fraction", type=types.fraction, default=0.005)
    p.add_argument("--late-fraction", type=types.fraction, default=0.02)
    p.add_argument("--shards", type=types.positive_int, default=4)
    p.add_argument("--unsigned", action="store_true", help="write unsigned envelopes")
    p.add_argument(
        "--address-skew", type=float, default=0.0, help="zipf exponent of packets per address"
    )
    add_quiet(p)
    g = p.add_argument_group("live mode (qis_beam/sim/live.py)")
    g.add_argument("--live", action="store_true", help="send with current event times")
    g.add_argument(
        "--to", type=types.transport_url, help="kafka://H:P/T, pubsub://projects/P/topics/T"
    )
    g.add_argument("--rate", type=types.rate, default="500/s", help="records per time, e.g. 500/s")
    g.add_argument("--duration", type=types.duration, help="stop after this long (default: Ctrl-C)")

    p = sub.add_parser("publish", help="send an existing packet log to a live transport")
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs")
    p.add_argument("--to", required=True, type=types.transport_url, help="transport URL")
    p.add_argument(
        "--rate", type=types.rate, help="records per time (default: as fast as possible)"
    )

    p = sub.add_parser("backfill", help="batch synthesis of packet logs (FnApiRunner by default)")
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs (local or gs://)")
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--bigquery-table", help="also append synthesis rows to PROJECT:DATASET.TABLE")
    p.add_argument(
        "--store", type=types.store_url, help=types.STORE_HELP + " (default OUTPUT/intelligence.db)"
    )
    add_quiet(p)
    add_profile(p)
    add_pipeline_options(p, table.BACKFILL)

    p = sub.add_parser(
        "replay",
        help="replay packet logs as a stream (TestStream, BundleBasedDirectRunner; not Prism)",
    )
    p.add_argument("--input", required=True, help="glob of TFRecord packet logs")
    p.add_argument("--output", required=True, help="output directory")
    add_quiet(p)
    add_profile(p)
    add_pipeline_options(p, table.REPLAY)

    p = sub.add_parser(
        "run", help="the production streaming job (Kafka on Flink, Pub/Sub on Dataflow)"
    )
    p.add_argument("--output", required=True, help="output directory (local or gs://)")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("--bigquery-table", help="also append synthesis rows to PROJECT:DATASET.TABLE")
    p.add_argument(
        "--store", type=types.store_url, help=types.STORE_HELP + ": upsert every snapshot"
    )
    add_profile(p)
    add_pipeline_options(p, table.RUN)

    p = sub.add_parser("query", help="print the latest synthesis for an address")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=types.store_url, help=types.STORE_HELP)
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
    p.add_argument("--store", required=True, type=types.store_url, help=types.STORE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1 only)")
    p.add_argument("--port", type=types.non_negative_int, default=50051, help="0: any free port")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--token-file", help="bearer tokens, one a line: every call needs one")
    p.add_argument(
        "--workers",
        type=types.positive_int,
        default=8,
        help="store connections (calls are coroutines; up to 64 in flight per connection)",
    )
    p.add_argument(
        "--processes", type=types.positive_int, default=1, help="server processes sharing the port"
    )

    p = sub.add_parser("demo", help="simulate a swarm, backfill it and query it (the main job)")
    p.add_argument("--out", default="qis-demo", help="working directory (default ./qis-demo)")
    p.add_argument("--packets", type=types.positive_int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    add_profile(p)

    p = sub.add_parser("report", help="an offline HTML report with figures of a run's outputs")
    p.add_argument("--output", required=True, help="a backfill/replay --output folder (local)")
    p.add_argument("--truth", help="the simulator's truth.json: recommended vs true best")
    p.add_argument("--to", help="report folder (default OUTPUT/report)")
    p.add_argument("--max-addresses", type=types.positive_int, help="addresses drawn in detail")

    from qis_beam.stack.cli import add_stack_parser  # the local engines (qis_beam/stack)

    add_stack_parser(sub)
    return parser
