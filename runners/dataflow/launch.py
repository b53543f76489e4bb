"""Flex-template entry point: ``qis-beam run --profile dataflow`` with the template's arguments.

The Dataflow launcher calls ``python launch.py --<name>=<value> ...`` with the template
parameters of ``metadata.json`` (``input_topic``, ``output``, ...) and the pipeline options
it manages itself (``--runner``, ``--project``, ``--region``, ``--temp_location``,
``--staging_location``, ``--sdk_container_image``, ...). Template parameter names use
underscores; the qis-beam command line spells them with hyphens, and its switches take no
value, so this file rewrites exactly the parameters declared in ``metadata.json`` and passes
everything else on unchanged. The ``dataflow`` profile comes first, so any option the launcher
passes overrides it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

METADATA = Path(__file__).with_name("metadata.json")
#: Template parameters that are qis-beam switches: "true" sets them, "false" leaves them off.
SWITCHES = frozenset({"allow_unsigned"})


def template_parameters(metadata: Path = METADATA) -> frozenset[str]:
    """The parameter names declared in the template metadata."""
    return frozenset(p["name"] for p in json.loads(metadata.read_text())["parameters"])


def to_cli_args(argv: Sequence[str], parameters: frozenset[str]) -> list[str]:
    """Rewrite ``--some_param=value`` template parameters into qis-beam's ``--some-param value``."""
    args: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, has_value, value = token[2:].partition("=")
        if not token.startswith("--") or name not in parameters:
            args.append(token)
            i += 1
            continue
        if not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        flag = "--" + name.replace("_", "-")
        if name in SWITCHES:
            if value.strip().lower() in ("", "true", "1", "yes"):
                args.append(flag)
        else:
            args.append(f"{flag}={value}")
        i += 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from qis_beam.cli import main as qis_main

    argv = list(sys.argv[1:] if argv is None else argv)
    args = to_cli_args(argv, template_parameters())
    if not any(a == "--source" or a.startswith("--source=") for a in args):
        args.insert(0, "--source=pubsub")
    return qis_main(["run", "--profile", "dataflow", *args])


if __name__ == "__main__":
    sys.exit(main())
