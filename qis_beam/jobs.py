"""Running a pipeline as a job: options, the run itself, then store and summary.

Every command that runs a pipeline goes through here: ``backfill`` (:func:`run_job`), ``replay``
(:func:`run_replay`) and ``run`` (:func:`run_streaming`). A bounded run writes aside, into
``DIR/_run-<id>/``, loads its synthesis into a copy of the default store there (or, with
``--store URL``, into that store once published), writes summary.json, commits and publishes
by renames (:mod:`qis_beam.publish`): a run killed at any moment leaves the previous outputs
and store as they were, and the next run clears what it left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from qis_beam.progress import Progress
from qis_beam.publish import (
    STORE_NAME,
    apply,
    commit,
    new_run_dir,
    pause_point,
    published_outputs,
    recover,
)
from qis_beam.replay import ReplayPlan, plan_replay
from qis_beam.settings import Settings
from qis_beam.store import new_run_id, open_store, redact
from qis_beam.summary import build_summary, counters, write_summary
from qis_beam.synthesis.columnar import gc_paused
from qis_beam.transforms.outputs import (
    DEAD_LETTERS_PREFIX,
    SYNTHESIS_PREFIX,
    TALLIES_PREFIX,
    output_path,
    read_json_lines,
    staged,
)

__all__ = ["STORE_NAME", "pipeline_options", "run_job", "run_replay", "run_streaming"]


def pipeline_options(beam_args: Sequence[str], default_runner: str, **overrides) -> PipelineOptions:
    options = PipelineOptions(list(beam_args), **overrides)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        # Never the bare DirectRunner: it tries to download Prism (beam-facts.md, "Runners").
        standard.runner = default_runner
    return options


def prepare_store(output_dir: str, run_dir: str, records: list[dict[str, Any]], run_id: str) -> str:
    """The default store: a copy of ``DIR/intelligence.db`` in the run's folder with the
    run's synthesis upserted (one transaction); published by a rename. Returns its final path."""
    target = output_path(output_dir, STORE_NAME)
    staged_copy = output_path(run_dir, STORE_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        local = FileSystems.get_scheme(staged_copy) in (None, "file")
        path = staged_copy if local else os.path.join(tmp, STORE_NAME)
        if FileSystems.exists(target):  # SQLite needs a local file: copy, never edit in place
            with FileSystems.open(target) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        with open_store(path, create=True) as store:
            store.load(records, run_id)
        if not local:
            with open(path, "rb") as src, FileSystems.create(staged_copy) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return target


def external_loader(output_dir: str, store_url: str | None) -> Callable[[dict], None]:
    """Loads a committed run's published synthesis into ``--store URL`` (idempotent upsert)."""

    def load(manifest: dict) -> None:
        if not store_url or redact(store_url) != manifest.get("store_url"):
            print(
                f"note: {output_dir}: a committed run was published without loading its "
                f"synthesis into {manifest.get('store_url')}; rerun it with that --store"
            )
            return
        with open_store(store_url, create=True) as store:
            store.load(read_json_lines(output_dir, SYNTHESIS_PREFIX), manifest["run_id"])

    return load


def is_flink(options: PipelineOptions) -> bool:
    """``--runner`` names Beam's FlinkRunner (``FlinkRunner``, ``flink`` or its class path)."""
    runner = options.view_as(StandardOptions).runner or ""
    return runner.rsplit(".", 1)[-1].lower() in ("flinkrunner", "flink")


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
    store_url: str | None = None,
    run_kind: str = "backfill",
) -> dict[str, Any]:
    """Build and run a bounded pipeline to completion; returns summary.json's content
    (or, for a dry run, what :func:`translate_only` returns)."""
    if is_dry_run(options):
        return translate_only(build, options)
    if not FileSystems.exists(output_dir):
        FileSystems.mkdirs(output_dir)
    load_external = external_loader(output_dir, store_url)
    for line in recover(output_dir, load_external):
        print(f"note: {line}")
    run_id = new_run_id(run_kind)
    run_dir = new_run_dir(output_dir)
    pause_point("staged")
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    with staged(output_dir, run_dir):  # the sinks write into run_dir
        build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    pause_point("pipeline-done")
    with gc_paused():  # records and rows hold no cycles (the collector cost ~20% here)
        records = list(read_json_lines(run_dir, SYNTHESIS_PREFIX))
        if store_url:
            store_path = redact(store_url)
        else:
            store_path = prepare_store(output_dir, run_dir, records, run_id)
    pause_point("store-ready")
    reasons = Counter(d["reason"] for d in read_json_lines(run_dir, DEAD_LETTERS_PREFIX))
    windowed = [r for r in records if r["window_start_ms"] is not None]
    counts = counters(result)
    # Where the run wrote exact tallies (replay), they replace the counters.
    counts.update({t["counter"]: t["value"] for t in read_json_lines(run_dir, TALLIES_PREFIX)})
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
            "summary": output_path(output_dir, "summary.json"),
        },
    )
    summary.update(extra or {})
    write_summary(run_dir, summary)
    manifest = {
        "files": [path.rsplit("/", 1)[-1] for path in published_outputs(run_dir)],
        "store": "external" if store_url else "copy",
        "store_url": redact(store_url) if store_url else None,
        "run_id": run_id,
    }
    commit(run_dir, manifest)
    pause_point("committed")
    apply(output_dir, run_dir, load_external)
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


def run_streaming(
    build: Callable[[beam.Pipeline], Any],
    options: PipelineOptions,
    wait: bool = False,
    on_submitted: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Submit an unbounded pipeline (or, for a dry run, only translate it). With ``wait``,
    block until it ends; Ctrl-C cancels it (files flushed so far stay, see
    ``WriteJsonLinesContinuously``) and the result says ``cancelled``."""
    if is_dry_run(options):
        return translate_only(build, options)
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    if on_submitted is not None:
        on_submitted(str(result.state))
    cancelled = False
    if wait:
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:  # a local job on an unbounded source never ends by itself
            result.cancel()
            cancelled = True
    return {
        "dry_run": False,
        "runner": options.view_as(StandardOptions).runner,
        "state": str(result.state),
        "cancelled": cancelled,
    }


def run_replay(
    paths: Sequence[str],
    output_dir: str,
    settings: Settings,
    beam_args: Sequence[str] = (),
    progress: Progress | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Replay logs through the streaming graph on the BundleBasedDirectRunner; ``progress``
    shows the planning, then the records replayed."""
    import contextlib

    from qis_beam.beam_internals.replay_speedups import indexed_direct_timers, memoised_dofn_specs
    from qis_beam.pipelines.replay import build_replay
    from qis_beam.replay import check_replay_runner

    options = pipeline_options(beam_args, default_runner="BundleBasedDirectRunner", streaming=True)
    runner = check_replay_runner(options.view_as(StandardOptions).runner)
    # Watermark steps no larger than the shortest timer period (beam-facts.md); each step
    # costs the DirectRunner a round over every stage, so not smaller either.
    step_ms = max(1_000, min(settings.stream.emit_every_ms, settings.windows.bucket_ms))
    progress = progress or Progress(enabled=False)
    progress.stage("replay: reading logs", unit="")
    plan = plan_replay(paths, settings.stream.watermark_delay_ms, step_ms)
    progress.stage("replay", total=plan.records, unit="records")
    # The DoFn-spec patch lives only as long as this run (and only on the DirectRunner).
    direct = runner == "BundleBasedDirectRunner"
    with (
        memoised_dofn_specs() if direct else contextlib.nullcontext(),
        indexed_direct_timers() if direct else contextlib.nullcontext(),
    ):
        summary = run_job(
            lambda p: build_replay(p, plan, replay_drain_ms(plan, settings), output_dir, settings),
            output_dir,
            options,
            extra={"replay": {"records": plan.records, "watermark_steps": len(plan.steps)}},
            run_kind="replay",
        )
    return summary, list(read_json_lines(output_dir, SYNTHESIS_PREFIX))
