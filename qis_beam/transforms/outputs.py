"""JSON Lines sinks (local or gs://), bounded and streaming; bounded runs write aside."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import time
import zlib
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window

SYNTHESIS_PREFIX = "synthesis"
DEAD_LETTERS_PREFIX = "dead_letters"
TALLIES_PREFIX = "tallies"  # replay only: exact counts (see transforms.streaming.tallies)


def output_path(output_dir: str, name: str) -> str:
    return FileSystems.join(output_dir, name)


# Output folder -> the folder the current bounded run writes to instead (see
# qis_beam.publish: a run writes aside and publishes by renames once complete). Set by
# qis_beam.jobs.run_job around building the pipeline, so every caller's build function
# stays ``build(pipeline)`` with the output folder it was given.
_staging: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "staging", default=None
)


@contextlib.contextmanager
def staged(output_dir: str, run_dir: str):
    token = _staging.set({**(_staging.get() or {}), _norm(output_dir): run_dir})
    try:
        yield
    finally:
        _staging.reset(token)


def _norm(path: str) -> str:
    path = path.rstrip("/") or path
    return os.path.abspath(path) if FileSystems.get_scheme(path) in (None, "file") else path


def write_dir(output_dir: str) -> str:
    """Where a sink for ``output_dir`` writes: the run's own folder while one is staged."""
    return (_staging.get() or {}).get(_norm(output_dir), output_dir)


class WriteJsonLines(beam.PTransform):
    """dicts -> ``<output_dir>/<prefix>-SSSSS-of-NNNNN.jsonl``."""

    def __init__(self, output_dir: str, prefix: str, num_shards: int = 0):
        super().__init__()
        self._prefix = output_path(write_dir(output_dir), prefix)
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
        self._output_dir = write_dir(output_dir)
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


class _WriteRolledFileFn(beam.DoFn):
    """One flush of one shard -> one file, written aside and renamed into place.

    Named by the job's launch time and the pane index (deterministic on retries, sorted in
    flush order): ``<prefix>-<launch ns>-<pane>-SSSSS-of-NNNNN.jsonl``.
    """

    def __init__(self, output_dir: str, prefix: str, shards: int, run_token: str):
        self._output_dir = output_dir
        self._prefix = prefix
        self._shards = shards
        self._run_token = run_token

    def process(self, element: tuple[int, Iterable[str]], pane=beam.DoFn.PaneInfoParam):
        shard, lines = element
        name = (
            f"{self._prefix}-{self._run_token}-{pane.index:08d}"
            f"-{shard:05d}-of-{self._shards:05d}.jsonl"
        )
        final = output_path(self._output_dir, name)
        temp = output_path(self._output_dir, f".{name}.tmp")  # outside the read pattern
        with FileSystems.create(temp) as handle:
            for line in lines:
                handle.write(line.encode("utf-8") + b"\n")
        FileSystems.rename([temp], [final])
        yield final


class WriteJsonLinesContinuously(beam.PTransform):
    """Unbounded records -> JSON Lines files rolled every ``flush_seconds`` of processing time.

    For ``run`` on Flink/Dataflow. Lines are grouped per shard and per flush, so each flush
    writes one file per shard (``fileio.WriteToFiles`` wrote one file per bundle: about a
    hundred per flush on a busy stream). The global window never expires, so late panes and
    too-late dead letters are written like everything else.
    """

    def __init__(self, output_dir: str, prefix: str, flush_seconds: int = 60, shards: int = 1):
        super().__init__()
        self._output_dir = output_dir
        self._prefix = prefix
        self._flush_seconds = flush_seconds
        self._shards = shards
        self._run_token = f"{time.time_ns():020d}"  # this launch: a restart never overwrites

    def expand(self, records):
        shards = self._shards
        return (
            records
            | "ToJson"
            >> beam.Map(lambda r: json.dumps(r, separators=(",", ":"))).with_output_types(str)
            | "AssignShard"
            >> beam.Map(
                lambda line: (zlib.crc32(line.encode("utf-8")) % shards, line)
            ).with_output_types(tuple[int, str])
            | "FlushEvery"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterProcessingTime(self._flush_seconds)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteFiles"
            >> beam.ParDo(
                _WriteRolledFileFn(self._output_dir, self._prefix, shards, self._run_token)
            )
        )
