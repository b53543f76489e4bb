"""JSON Lines sinks (local or gs://) and clean-up of a previous run's shards."""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

SYNTHESIS_PREFIX = "synthesis"
DEAD_LETTERS_PREFIX = "dead_letters"


def output_path(output_dir: str, name: str) -> str:
    return FileSystems.join(output_dir, name)


class WriteJsonLines(beam.PTransform):
    """dicts -> ``<output_dir>/<prefix>-SSSSS-of-NNNNN.jsonl``."""

    def __init__(self, output_dir: str, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix = output_path(output_dir, prefix)
        self._num_shards = num_shards

    def expand(self, records):
        return (
            records
            | "ToJson" >> beam.Map(lambda r: json.dumps(r, separators=(",", ":"))).with_output_types(str)
            | "WriteJsonl"
            >> beam.io.WriteToText(
                self._prefix,
                file_name_suffix=".jsonl",
                shard_name_template="-SSSSS-of-NNNNN",
                num_shards=self._num_shards,
            )
        )


def remove_previous_outputs(output_dir: str) -> None:
    """Delete shards a previous run left, so a re-run never mixes old and new shards."""
    for prefix in (SYNTHESIS_PREFIX, DEAD_LETTERS_PREFIX):
        pattern = output_path(output_dir, f"{prefix}-*.jsonl")
        stale = [m.path for result in FileSystems.match([pattern]) for m in result.metadata_list]
        if stale:
            FileSystems.delete(stale)


def read_json_lines(output_dir: str, prefix: str):
    """Records of a run's JSON Lines output, in shard order."""
    pattern = output_path(output_dir, f"{prefix}-*.jsonl")
    paths = sorted(m.path for result in FileSystems.match([pattern]) for m in result.metadata_list)
    for path in paths:
        with FileSystems.open(path) as handle:
            for line in handle.read().decode("utf-8").splitlines():
                if line:
                    yield json.loads(line)
