"""Every use of a private Apache Beam API, behind one version check.

qis-beam leans on a few Beam internals that have no public equivalent: TFRecord framing
(``_TFRecordUtil``), the argument parser that knows every pipeline option
(``_BeamArgumentParser``), and the DirectRunner speed-ups of ``replay_speedups``. They were
checked against the Beam minors in ``SUPPORTED_BEAM_MINORS``; on any other Beam these
accessors refuse with one clear error instead of misbehaving silently.
"""

from __future__ import annotations

import argparse
import functools

# Beam minor versions whose internals used here were checked.
SUPPORTED_BEAM_MINORS = ("2.77",)


class UnsupportedBeamError(RuntimeError):
    """The installed Beam is not one whose internals qis-beam was checked against."""


def check_beam_version(version: str | None = None) -> None:
    if version is None:
        import apache_beam

        version = apache_beam.__version__
    minor = ".".join(version.split(".")[:2])
    if minor not in SUPPORTED_BEAM_MINORS:
        supported = ", ".join(f"{m}.x" for m in SUPPORTED_BEAM_MINORS)
        raise UnsupportedBeamError(
            f"qis-beam uses Beam internals checked only on apache-beam {supported}, found "
            f"{version}: install 'apache-beam[gcp]=={SUPPORTED_BEAM_MINORS[-1]}.*' or re-check "
            f"qis_beam/beam_internals/ against this Beam"
        )


@functools.cache
def tfrecord_util():
    """Beam's TFRecord framing helper (masked CRC-32C, ``write_record``)."""
    check_beam_version()
    from apache_beam.io.tfrecordio import _TFRecordUtil

    return _TFRecordUtil


@functools.cache
def pipeline_option_parser() -> argparse.ArgumentParser:
    """An argument parser holding every Beam pipeline option of the installed SDK."""
    check_beam_version()
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def option_dest(flag: str) -> str | None:
    """The destination of a Beam ``--flag`` (aliases resolved), or None if Beam has no such flag."""
    action = pipeline_option_parser()._option_string_actions.get(flag)
    return None if action is None else action.dest
