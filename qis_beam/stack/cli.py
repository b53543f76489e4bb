"""``qis-beam stack fetch|up|status|down|env|add-taskmanager`` (registered by qis_beam/cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FETCHABLE = ("flink", "flink_job_server", "kafka", "prism")


def _pieces(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown piece {', '.join(bad) or repr(text)}; choose from {','.join(choices)}"
            )
        return names

    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return port


def add_stack_parser(sub) -> None:
    """Add ``stack`` and its subcommands to the ``qis-beam`` subparsers ``sub``."""
    from qis_beam.stack.control import PIECES
    from qis_beam.stack.paths import default_state_dir

    stack = sub.add_parser(
        "stack",
        help="the local engines on 127.0.0.1: Flink, Kafka, Pub/Sub emulator, Postgres, Prism",
    )
    actions = stack.add_subparsers(dest="stack_command", required=True, parser_class=type(stack))

    def state_dir(p):
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help=f"logs, config, data and PIDs (default $QIS_STACK_DIR or {default_state_dir()})",
        )

    p = actions.add_parser("fetch", help="download and verify the pinned engines into the cache")
    p.add_argument("--only", type=_pieces(FETCHABLE), help=f"comma list of {','.join(FETCHABLE)}")

    p = actions.add_parser("up", help="start the pieces and wait until each is healthy")
    p.add_argument("--only", type=_pieces(PIECES), help=f"comma list of {','.join(PIECES)}")
    state_dir(p)
    p.add_argument("--flink-port", type=_port, help="Flink REST port (default: a free port)")
    p.add_argument("--kafka-port", type=_port, help="Kafka broker port (default: a free port)")
    p.add_argument("--pubsub-port", type=_port, help="Pub/Sub emulator port")
    p.add_argument("--postgres-port", type=_port, help="PostgreSQL port")
    p.add_argument("--prism-port", type=_port, help="Prism job service port")

    p = actions.add_parser("status", help="what runs, its endpoints, alive or dead")
    state_dir(p)
    p.add_argument("--json", action="store_true", help="machine-readable")

    p = actions.add_parser("down", help="stop exactly the processes `up` recorded")
    p.add_argument("--only", type=_pieces(PIECES), help=f"comma list of {','.join(PIECES)}")
    p.add_argument(
        "--purge", action="store_true", help="also delete PostgreSQL's data (kept across up/down)"
    )
    state_dir(p)

    p = actions.add_parser("env", help="print shell exports of the running endpoints")
    state_dir(p)

    p = actions.add_parser("add-taskmanager", help="start one more Flink TaskManager")
    state_dir(p)


def _human(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def cmd_fetch(args) -> int:
    from qis_beam.stack.fetch import FETCHERS, cached_size, unavailable
    from qis_beam.stack.pins import pins

    versions = {n: pins()[n]["version"] for n in FETCHABLE}
    for name in args.only or FETCHABLE:
        fetched = FETCHERS[name]()
        how = "downloaded, verified" if fetched.downloaded else "cached, verified"
        print(
            f"{name} {versions[name]}: {how} ({_human(cached_size(fetched.path))}) {fetched.path}"
        )
    if args.only is None or "flink" in args.only:
        for key, item in unavailable().items():
            print(
                f"{key}: not available ({item['artifact']}): {item['reason']}; "
                f"supply it with {item['supply']}"
            )
    if args.only is None:
        _report_debian_pieces()
    return 0


def _report_debian_pieces() -> None:
    """PostgreSQL and the emulator come from apt, not from the cache: say where (or that not)."""
    from qis_beam.stack.postgres import PostgresMissing, bin_dir
    from qis_beam.stack.pubsub import EmulatorMissing, emulator_launcher

    try:
        found = bin_dir()
        print(f"postgres {found.parent.name}: Debian postgresql ({found})")
    except PostgresMissing as error:
        print(f"postgres: {error}")
    try:
        print(f"pubsub: Debian google-cloud-cli-pubsub-emulator ({emulator_launcher()})")
    except EmulatorMissing as error:
        print(f"pubsub: {error}")


def _state_dir(args) -> Path:
    from qis_beam.stack.paths import default_state_dir

    return (args.state_dir or default_state_dir()).resolve()


def _endpoint_line(name: str, endpoints: dict[str, str]) -> str:
    return f"{name:<9}" + "  ".join(f"{k}={v}" for k, v in endpoints.items())


def cmd_up(args) -> int:
    from qis_beam.stack.control import up

    ports = {
        "flink": {"rest": args.flink_port},
        "kafka": {"broker": args.kafka_port},
        "pubsub": {"port": args.pubsub_port},
        "postgres": {"port": args.postgres_port},
        "prism": {"job": args.prism_port},
    }
    state = _state_dir(args)

    def report(started) -> None:
        print(
            f"  {started.piece.name:<9}healthy after {started.seconds:.1f}s "
            f"(log: {started.piece.log})",
            flush=True,
        )

    print(f"starting {','.join(args.only) if args.only else 'all pieces'} in {state}", flush=True)
    started = up(state, args.only, ports, on_healthy=report)
    for name, item in started.items():
        if item.already_running:
            print(f"  {name:<9}already running", flush=True)
    print("endpoints:")
    for name, item in started.items():
        print("  " + _endpoint_line(name, item.piece.endpoints))
    print(f"stop with: qis-beam stack down --state-dir {state}")
    return 0


def cmd_status(args) -> int:
    from qis_beam.stack.control import status
    from qis_beam.stack.procs import alive

    state = _state_dir(args)
    pieces = status(state)
    rows = {}
    for name, piece in pieces.items():
        procs = [
            {"role": p.role, "pid": p.pid, "alive": alive(p), "log": p.log} for p in piece.procs
        ]
        rows[name] = {
            "alive": all(p["alive"] for p in procs),
            "procs": procs,
            "endpoints": piece.endpoints,
        }
    if args.json:
        print(json.dumps({"state_dir": str(state), "pieces": rows}, indent=2))
    elif not rows:
        print(f"nothing recorded in {state}")
    else:
        print(f"stack in {state}")
        for name, row in rows.items():
            pids = ", ".join(
                f"{p['role']} {p['pid']} {'alive' if p['alive'] else 'DEAD'}" for p in row["procs"]
            )
            print(f"  {name:<9}{'running' if row['alive'] else 'DEAD   '}  {pids}")
            print(f"  {'':<9}" + "  ".join(f"{k}={v}" for k, v in row["endpoints"].items()))
    return 0 if all(r["alive"] for r in rows.values()) else 1


def cmd_down(args) -> int:
    from qis_beam.stack.control import down

    state = _state_dir(args)
    stopped = down(state, args.only, purge=args.purge)
    if not stopped:
        print(f"nothing recorded in {state}")
    for name, pids in stopped.items():
        what = f"stopped PIDs {', '.join(map(str, pids))}" if pids else "was not running"
        print(f"  {name:<9}{what}")
    return 0


def cmd_env(args) -> int:
    """Shell exports, e.g. ``eval "$(qis-beam stack env)"``."""
    from qis_beam.stack.control import running, status

    exports = {
        ("pubsub", "host"): "PUBSUB_EMULATOR_HOST",
        ("kafka", "bootstrap"): "QIS_KAFKA_BOOTSTRAP",
        ("postgres", "url"): "QIS_POSTGRES_URL",
        ("flink", "flink_master"): "QIS_FLINK_MASTER",
        ("flink", "sdk_worker_pool"): "QIS_SDK_WORKER_POOL",
        ("prism", "job_endpoint"): "QIS_PRISM_JOB_ENDPOINT",
    }
    pieces = status(_state_dir(args))
    for (name, key), var in exports.items():
        piece = pieces.get(name)
        if piece is not None and running(piece) and key in piece.endpoints:
            print(f"export {var}={piece.endpoints[key]}")
    return 0


def cmd_add_taskmanager(args) -> int:
    from qis_beam.stack.control import add_taskmanager

    proc = add_taskmanager(_state_dir(args))
    print(f"taskmanager {proc.role} PID {proc.pid} registered (log: {proc.log})")
    return 0


HANDLERS = {
    "fetch": cmd_fetch,
    "up": cmd_up,
    "status": cmd_status,
    "down": cmd_down,
    "env": cmd_env,
    "add-taskmanager": cmd_add_taskmanager,
}


def cmd_stack(args, beam_args) -> int:
    """Entry point from qis_beam.cli; failures are one line on stderr and exit code 1."""
    from qis_beam.stack.control import StackError
    from qis_beam.stack.digests import DigestMismatch
    from qis_beam.stack.fetch import FetchError
    from qis_beam.stack.health import PieceFailed
    from qis_beam.stack.maven import MavenError
    from qis_beam.stack.postgres import PostgresMissing
    from qis_beam.stack.pubsub import EmulatorMissing

    if beam_args:
        from qis_beam.cli import UsageError

        raise UsageError(f"unrecognized arguments: {' '.join(beam_args)}")
    try:
        return HANDLERS[args.stack_command](args)
    except (
        DigestMismatch,
        FetchError,
        MavenError,
        PieceFailed,
        StackError,
        PostgresMissing,
        EmulatorMissing,
    ) as error:
        print(f"qis-beam stack {args.stack_command}: {error}", file=sys.stderr)
        return 1
