"""Running a pipeline as a job: options, the run itself, then store and summary.

Shared by ``backfill`` and ``replay``: both end by loading the run's synthesis into the
intelligence store (one process, one transaction) and writing summary.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from qis_beam.replay import ReplayPlan, plan_replay
from qis_beam.settings import Settings
from qis_beam.store import IntelligenceStore
from qis_beam.summary import build_summary, counters, write_summary
from qis_beam.transforms.outputs import (
    DEAD_LETTERS_PREFIX,
    SYNTHESIS_PREFIX,
    TALLIES_PREFIX,
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


def load_store(output_dir: str) -> tuple[str, list[dict[str, Any]]]:
    """Load the run's synthesis into ``<output_dir>/intelligence.db``: (path, records)."""
    records = list(read_json_lines(output_dir, SYNTHESIS_PREFIX))
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
    return target, records


def is_dataflow(options: PipelineOptions) -> bool:
    return (options.view_as(StandardOptions).runner or "").lower() in ("dataflowrunner", "dataflow")


def is_dry_run(options: PipelineOptions) -> bool:
    """``DataflowRunner --dry_run``: the job is translated, nothing is submitted or written.
    (Beam's other runners ignore ``--dry_run``.)"""
    return bool(options.view_as(TestOptions).dry_run) and is_dataflow(options)


def translate_only(build: Callable[[beam.Pipeline], Any], options: PipelineOptions) -> dict:
    """A dry run: build and translate the job; touches no output, store or summary."""
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    job = pipeline.run().job
    return {
        "dry_run": True,
        "runner": options.view_as(StandardOptions).runner,
        "job_type": job.proto.type.name,
        "transforms": len(pipeline.to_runner_api().components.transforms),
    }


def run_job(
    build: Callable[[beam.Pipeline], Any],
    output_dir: str,
    options: PipelineOptions,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and run a bounded pipeline to completion; returns summary.json's content
    (or, for a dry run, what :func:`translate_only` returns)."""
    if is_dry_run(options):
        return translate_only(build, options)
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    remove_previous_outputs(output_dir)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    store_path, records = load_store(output_dir)
    reasons = Counter(d["reason"] for d in read_json_lines(output_dir, DEAD_LETTERS_PREFIX))
    windowed = [r for r in records if r["window_start_ms"] is not None]
    counts = counters(result)
    # Where the run wrote exact tallies (replay), they replace the counters.
    counts.update({t["counter"]: t["value"] for t in read_json_lines(output_dir, TALLIES_PREFIX)})
    summary = build_summary(
        counts,
        dead_letter_reasons=dict(reasons),
        synthesis_records={"windowed": len(windowed), "all_time": len(records) - len(windowed)},
        runner=options.view_as(StandardOptions).runner,
        wall_time_s=time.perf_counter() - started,
        addresses=len({r["address"] for r in records}),
        windows=len({(r["window_start_ms"], r["window_end_ms"]) for r in windowed}),
        outputs={
            "synthesis": output_path(output_dir, f"{SYNTHESIS_PREFIX}-*.jsonl"),
            "dead_letters": output_path(output_dir, f"{DEAD_LETTERS_PREFIX}-*.jsonl"),
            "store": store_path,
        },
    )
    summary.update(extra or {})
    summary["outputs"]["summary"] = write_summary(output_dir, summary)
    return summary


def replay_drain_ms(plan: ReplayPlan, settings: Settings) -> int:
    """A watermark past every timer the replay can have set (state, dedupe, windows)."""
    windows, stream = settings.windows, settings.stream
    horizon = max(
        stream.state_ttl_ms,
        stream.dedupe_ttl_ms,
        windows.size_ms + windows.allowed_lateness_ms,
    )
    return (plan.last_event_ms or 0) + horizon + stream.emit_every_ms + 3_600_000


def run_replay(
    paths: Sequence[str], output_dir: str, settings: Settings, beam_args: Sequence[str] = ()
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Replay logs through the streaming graph on the BundleBasedDirectRunner."""
    from qis_beam.pipelines.replay import build_replay
    from qis_beam.replay_speedups import memoise_qis_dofn_specs

    memoise_qis_dofn_specs()
    # Watermark steps no larger than the shortest timer period (beam-facts.md); each step
    # costs the DirectRunner a round over every stage, so not smaller either.
    step_ms = max(1_000, min(settings.stream.emit_every_ms, settings.windows.bucket_ms))
    plan = plan_replay(paths, settings.stream.watermark_delay_ms, step_ms)
    options = pipeline_options(beam_args, default_runner="BundleBasedDirectRunner", streaming=True)
    summary = run_job(
        lambda p: build_replay(p, plan, replay_drain_ms(plan, settings), output_dir, settings),
        output_dir,
        options,
        extra={"replay": {"records": plan.records, "watermark_steps": len(plan.steps)}},
    )
    return summary, list(read_json_lines(output_dir, SYNTHESIS_PREFIX))
