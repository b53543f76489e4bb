"""Beam's own view of pipeline options, for the profile and translation tests.

The tests parse with Beam's parser directly (not qis_beam.beam_internals) so they check the
profiles against Beam, not against the code under test.
"""

from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

# A syntactically valid bucket: an invalid one (e.g. gs://b) makes DataflowRunner fall back to
# creating a default bucket, over the network.
DRY_RUN_ARGS = ["--project=qis-dry-run", "--temp_location=gs://qis-dry-run/tmp", "--dry_run=True"]


def beam_parser() -> _BeamArgumentParser:
    """Every pipeline option of the installed Beam, parsed the way PipelineOptions does."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def parse_beam(args: list[str]) -> tuple[dict, list[str]]:
    try:
        known, unknown = beam_parser().parse_known_args(args)
    except SystemExit:
        pytest.fail(f"Beam rejects a value in {args}")
    return vars(known), unknown


def flag_name(arg: str) -> str:
    return arg[2:].split("=", 1)[0]


def flag_value(args: list[str], name: str) -> str | None:
    for arg in args:
        if flag_name(arg) == name:
            return arg.split("=", 1)[1] if "=" in arg else ""
    return None
