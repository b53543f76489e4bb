"""Running a pipeline as a job: options, the run itself, then store and summary.

Shared by ``backfill`` and ``replay``: both end by loading the run's synthesis into the
intelligence store (one process, one transaction) and writing summary.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from qis_beam.store import IntelligenceStore
from qis_beam.summary import build_summary, counters, write_summary
from qis_beam.transforms.outputs import (
    SYNTHESIS_PREFIX,
    output_path,
    read_json_lines,
    remove_previous_outputs,
)

STORE_NAME = "intelligence.db"


def pipeline_options(beam_args: Sequence[str], default_runner: str, **overrides) -> PipelineOptions:
    options = PipelineOptions(list(beam_args), **overrides)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        # Never the bare DirectRunner: it tries to download Prism (beam-facts.md, "Runners").
        standard.runner = default_runner
    return options


def load_store(output_dir: str) -> tuple[str, int, int]:
    """Load the run's synthesis into ``<output_dir>/intelligence.db``: (path, addresses, windows)."""
    records = list(read_json_lines(output_dir, SYNTHESIS_PREFIX))
    addresses = {r["address"] for r in records}
    windows = {(r["window_start_ms"], r["window_end_ms"]) for r in records if r["window_start_ms"] is not None}
    target = output_path(output_dir, STORE_NAME)
    local = FileSystems.get_scheme(target) in (None, "file")
    if local:
        with IntelligenceStore(target, create=True) as store:
            store.load(records)
    else:  # build locally, then upload whole (SQLite needs a local file)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, STORE_NAME)
            with IntelligenceStore(path, create=True) as store:
                store.load(records)
            with open(path, "rb") as src, FileSystems.create(target) as dst:
                dst.write(src.read())
    return target, len(addresses), len(windows)


def run_job(
    build: Callable[[beam.Pipeline], Any],
    output_dir: str,
    options: PipelineOptions,
) -> dict[str, Any]:
    """Build and run a bounded pipeline to completion; returns summary.json's content."""
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    remove_previous_outputs(output_dir)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    store_path, addresses, windows = load_store(output_dir)
    summary = build_summary(
        counters(result),
        runner=options.view_as(StandardOptions).runner,
        wall_time_s=time.perf_counter() - started,
        addresses=addresses,
        windows=windows,
        outputs={
            "synthesis": output_path(output_dir, f"{SYNTHESIS_PREFIX}-*.jsonl"),
            "dead_letters": output_path(output_dir, "dead_letters-*.jsonl"),
            "store": store_path,
        },
    )
    summary["outputs"]["summary"] = write_summary(output_dir, summary)
    return summary
