"""The ``qis-beam`` command line (spec section 8).

``parser`` builds the arguments (the pipeline flags derived from :mod:`qis_beam.options`),
``pipelines`` runs ``backfill``/``replay``/``run`` through :mod:`qis_beam.jobs`, ``commands``
holds the rest, ``beamargs`` the Beam pass-through and ``--profile``. Bad arguments print one
line and exit with code 2; an unsupported Beam is one line and exit code 1.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Sequence

from qis_beam.beam_internals import UnsupportedBeamError
from qis_beam.cli import commands, pipelines
from qis_beam.cli.parser import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    UsageError,
    build_parser,
    refuse_foreign,
)

__all__ = ["EXIT_NOT_FOUND", "EXIT_USAGE", "UsageError", "main"]

# The reader of stdout went away (``qis-beam query ... | head``): stop quietly.
EXIT_BROKEN_PIPE = 1

COMMANDS = {
    "simulate": commands.cmd_simulate,
    "publish": commands.cmd_publish,
    "backfill": pipelines.cmd_backfill,
    "replay": pipelines.cmd_replay,
    "run": pipelines.cmd_run,
    "query": commands.cmd_query,
    "serve": commands.cmd_serve,
    "demo": commands.cmd_demo,
    "report": commands.cmd_report,
    "stack": commands.cmd_stack,
}


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr: where a job that seems stuck
    is waiting (with LOOPBACK, the SDK harness's threads are in this process). Only where
    stderr is a file (not when a caller, e.g. a test, replaced it with a buffer)."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr.fileno(), all_threads=True)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _stacks_on_sigusr1()
    args = None
    try:
        args, beam_args = build_parser().parse_known_args(argv)
        refuse_foreign(args.command, beam_args)
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
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull so the flush at exit cannot fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file descriptor (e.g. captured)
            pass
        return EXIT_BROKEN_PIPE
