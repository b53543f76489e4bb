"""The commands that run no pipeline of their own: simulate, publish, query, serve, demo, report,
stack."""

from __future__ import annotations

import json
import sys

from qis_beam.cli.beamargs import beam_args as resolve_beam_args
from qis_beam.cli.beamargs import match_input, no_beam_args
from qis_beam.cli.parser import EXIT_NOT_FOUND, UsageError


def cmd_simulate(args, beam_args) -> int:
    no_beam_args(beam_args)
    from qis_beam.progress import Progress, wanted
    from qis_beam.progress import advance as report_progress
    from qis_beam.sim import SwarmConfig, simulate

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
        from qis_beam.sim.live import simulate_live_command

        return simulate_live_command(config, args)

    with Progress(enabled=wanted(args.quiet)) as progress:
        shown = 0

        def advance(done: int, total: int) -> None:
            nonlocal shown
            if not shown and done < total:
                progress.stage("simulate", total=total, unit="records")
            if shown or done < total:
                report_progress(done - shown)
                shown = done

        report = simulate(args.out, config, progress=advance)
    print(
        f"wrote {report.records} records ({report.valid} valid, {report.duplicates} duplicates, "
        f"{report.conflicting} conflicting, {sum(report.malformed_by_reason.values())} malformed) "
        f"to {args.out}"
    )
    for path in report.files:
        print(f"  {path}")
    return 0


def cmd_publish(args, beam_args) -> int:
    no_beam_args(beam_args)
    from qis_beam.sim.sending import publish_command

    return publish_command([m.path for m in match_input(args.input)], args)


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
    no_beam_args(beam_args)
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
    no_beam_args(beam_args)
    from qis_beam.service.commands import serve, serve_config

    try:
        config = serve_config(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return serve(args, config)


def cmd_demo(args, beam_args) -> int:
    from qis_beam.sim.demo import run_demo

    beam_args = resolve_beam_args(args.profile, beam_args, streaming=False)
    return run_demo(args.out, packets=args.packets, seed=args.seed, beam_args=beam_args)


def cmd_report(args, beam_args) -> int:
    no_beam_args(beam_args)
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


def cmd_stack(args, beam_args) -> int:
    from qis_beam.stack.cli import cmd_stack as stack

    return stack(args, beam_args)
