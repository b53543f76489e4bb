"""The Beam side of a command line: ``--profile``, pass-through options, input globs."""

from __future__ import annotations

from collections.abc import Sequence

from qis_beam.cli.parser import UsageError

# Beam options that take a value but are written as switches (Beam's own parser would
# reject ``--dry_run --project P``: "expected one argument").
_SWITCH_LIKE_OPTIONS = ("--dry_run",)


def switches_as_values(beam_args: Sequence[str]) -> list[str]:
    args = list(beam_args)
    for i, arg in enumerate(args):
        at_end_or_option = i + 1 == len(args) or args[i + 1].startswith("-")
        if arg in _SWITCH_LIKE_OPTIONS and at_end_or_option:
            args[i] = f"{arg}=True"
    return args


def beam_args(profile: str | None, args: Sequence[str], streaming: bool) -> list[str]:
    """Apply ``--profile`` (explicit Beam options win) and reject anything not a Beam option.

    The switch rewrite happens first, so a profile composes with every switch form."""
    from qis_beam.runners.profiles import (
        merge_args,
        missing_options,
        profile_args,
        unrecognized_args,
    )

    merged = switches_as_values(args)
    try:
        if profile:
            merged = merge_args(profile_args(profile, streaming), merged)
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
    check_dataflow_options(merged)
    return merged


def no_beam_args(args: Sequence[str]) -> None:
    """For commands that run no pipeline."""
    if args:
        raise UsageError(f"unrecognized arguments: {' '.join(args)}")


def check_dataflow_options(args: list[str]) -> None:
    """Beam's offline checks of a Dataflow job's cloud options, run up front: a bad project or
    bucket is one line and exit 2, not a traceback once the pipeline is built. A dry run
    with no valid bucket is refused: Beam would try to create a default bucket online."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    from qis_beam.jobs import is_dataflow, is_dry_run

    options = PipelineOptions(args)
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


def match_input(pattern: str) -> list:
    """The files of ``--input`` (Beam FileMetadata: path and size), sorted by path."""
    from apache_beam.io.filesystems import FileSystems

    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # noqa: BLE001 - any filesystem failure is a bad --input
        raise UsageError(f"--input {pattern}: {error}") from None
    if not matched:
        raise UsageError(f"--input {pattern}: no files match")
    return sorted(matched, key=lambda m: m.path)
