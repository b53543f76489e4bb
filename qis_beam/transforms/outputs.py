"""JSON Lines sinks (local or gs://), bounded and streaming, and clean-up of old shards."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window

SYNTHESIS_PREFIX = "synthesis"
DEAD_LETTERS_PREFIX = "dead_letters"
TALLIES_PREFIX = "tallies"  # replay only: exact counts (see stream.TallyStream)


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
            | "ToJson"
            >> beam.Map(lambda r: json.dumps(r, separators=(",", ":"))).with_output_types(str)
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
    for prefix in (SYNTHESIS_PREFIX, DEAD_LETTERS_PREFIX, TALLIES_PREFIX):
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


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir: str, prefix: str, shards: int):
        self._output_dir = output_dir
        self._prefix = prefix
        self._shards = shards

    def process(self, element: tuple[int, Iterable[str]]) -> Iterator[str]:
        shard, lines = element
        path = output_path(
            self._output_dir, f"{self._prefix}-{shard:05d}-of-{self._shards:05d}.jsonl"
        )
        with FileSystems.create(path) as handle:
            for line in lines:
                handle.write(line.encode("utf-8") + b"\n")
        yield path


class WriteJsonLinesOnDrain(beam.PTransform):
    """Streaming records -> JSON Lines shards written once the stream has drained.

    For ``replay``: its TestStream ends, so everything is written when the global window
    closes, late panes included (Beam's own streaming file sinks window by event time with
    no lateness and would drop late panes and too-late dead letters).
    """

    def __init__(self, output_dir: str, prefix: str, shards: int = 1):
        super().__init__()
        self._output_dir = output_dir
        self._prefix = prefix
        self._shards = shards

    def expand(self, records):
        shards = self._shards
        return (
            records
            | "ToJson" >> beam.Map(lambda r: json.dumps(r, separators=(",", ":")))
            | "AssignShard"
            >> beam.Map(
                lambda line: (zlib.crc32(line.encode("utf-8")) % shards, line)
            ).with_output_types(tuple[int, str])
            # Fires when the global window closes, i.e. when the finite stream has drained.
            | "HoldUntilDrained"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterWatermark()),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShardFn(self._output_dir, self._prefix, shards))
        )


class WriteJsonLinesContinuously(beam.PTransform):
    """Unbounded records -> JSON Lines files flushed every ``flush_seconds`` of processing time.

    For ``run`` on Flink/Dataflow. The global window never expires, so late panes and
    too-late dead letters are written like everything else.
    """

    def __init__(self, output_dir: str, prefix: str, flush_seconds: int = 60):
        super().__init__()
        self._output_dir = output_dir
        self._prefix = prefix
        self._flush_seconds = flush_seconds

    def expand(self, records):
        return (
            records
            | "ToJson"
            >> beam.Map(lambda r: json.dumps(r, separators=(",", ":"))).with_output_types(str)
            | "FlushEvery"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterProcessingTime(self._flush_seconds)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "WriteFiles"
            >> fileio.WriteToFiles(
                path=self._output_dir,
                file_naming=fileio.default_file_naming(self._prefix, ".jsonl"),
                shards=1,
            )
        )
