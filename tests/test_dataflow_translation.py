"""Translation through the job API and for Dataflow: the backfill through the PortableRunner
equals the FnApiRunner, and the streaming and backfill graphs translate offline for Dataflow
with portable state and deterministic key coders (spec section 9)."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    PipelineOptions,
)
from beam_options import DRY_RUN_ARGS, flag_name

from qis_beam.runners.profiles import (
    merge_args,
    profile_args,
)

# --- the real pipelines under the profiles -----------------------------------------------


def simulate_swarm(directory: Path):
    from qis_beam.sim import SwarmConfig, simulate

    config = SwarmConfig(nodes=20, addresses=5, approaches=4, packets=3000, seed=7, shards=2)
    simulate(str(directory), config)
    return config


def backfill_settings(swarm: Path, config):
    from qis_beam.settings import Settings
    from qis_beam.signing import load_registry
    from qis_beam.validation import ValidationPolicy

    registry = load_registry(swarm / "nodes.txt")
    now = config.start_ms + 10 * config.span_ms
    return Settings(validation=ValidationPolicy(registry=registry, now_ms=now))


def canonical_outputs(output: str) -> tuple[list[str], list[str]]:
    from qis_beam.transforms.outputs import DEAD_LETTERS_PREFIX, SYNTHESIS_PREFIX, read_json_lines

    def lines(prefix):
        return sorted(json.dumps(r, sort_keys=True) for r in read_json_lines(output, prefix))

    return lines(SYNTHESIS_PREFIX), lines(DEAD_LETTERS_PREFIX)


@pytest.mark.slow
def test_backfill_through_the_job_api_equals_fnapi(tmp_path):
    """The Job API path FlinkRunner uses gives the same synthesis as FnApiRunner."""
    from qis_beam.jobs import run_job
    from qis_beam.pipelines.backfill import build_backfill

    swarm = tmp_path / "swarm"
    settings = backfill_settings(swarm, simulate_swarm(swarm))
    pattern = str(swarm / "packets-*.tfrecord")
    results = {}
    for name in ("direct", "portable"):
        output = str(tmp_path / name)
        summary = run_job(
            lambda p, output=output: build_backfill(p, pattern, output, settings),
            output,
            PipelineOptions(profile_args(name, streaming=False)),
        )
        assert summary["balanced"]
        results[name] = canonical_outputs(output)
    synthesis, dead_letters = results["direct"]
    assert synthesis and dead_letters
    assert results["portable"] == results["direct"]


def _key_urn(components, coder_id: str) -> str:
    """A key coder's URN; a typed 2-tuple key (e.g. (packet_id, deadline), a KV coder)
    reports its first part that is not deterministic, else its first part."""
    key = components.coders[coder_id]
    if key.spec.urn != "beam:coder:kv:v1":
        return key.spec.urn
    parts = [components.coders[c].spec.urn for c in key.component_coder_ids]
    return next((urn for urn in parts if urn not in DETERMINISTIC_KEY_CODERS), parts[0])


def keyed_steps(proto) -> dict[str, tuple[str, str | None, list[str]]]:
    """Stateful ParDos: label -> (input coder URN, key coder URN, state spec kinds)."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    components = proto.components
    steps = {}
    for transform in components.transforms.values():
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        if not (payload.state_specs or payload.timer_family_specs):
            continue
        main_input = next(
            pc for tag, pc in transform.inputs.items() if tag not in payload.side_inputs
        )
        coder = components.coders[components.pcollections[main_input].coder_id]
        key = (
            _key_urn(components, coder.component_coder_ids[0])
            if coder.component_coder_ids
            else None
        )
        kinds = [spec.WhichOneof("spec") for spec in payload.state_specs.values()]
        steps[transform.unique_name] = (coder.spec.urn, key, kinds)
    return steps


# State kinds every portable runner supports (beam-facts: no ordered-list state on Flink or
# Dataflow v2, no map state in Python).
PORTABLE_STATE_KINDS = {"read_modify_write_spec", "bag_spec", "combining_spec", "set_spec"}
DETERMINISTIC_KEY_CODERS = {
    "beam:coder:string_utf8:v1",
    "beam:coder:bytes:v1",
    "beam:coder:varint:v1",
}


@pytest.mark.slow
def test_streaming_pipeline_translates_for_dataflow_with_portable_state():
    from qis_beam.pipelines.run import SourceSettings, build_run
    from qis_beam.settings import Settings

    profile = [a for a in profile_args("dataflow", True) if flag_name(a) != "setup_file"]
    pipeline = beam.Pipeline(options=PipelineOptions(merge_args(profile, DRY_RUN_ARGS)))
    source = SourceSettings(kind="pubsub", topic="projects/qis-dry-run/topics/qis-packets")
    build_run(pipeline, source, "gs://qis-dry-run/out", Settings())
    result = pipeline.run()
    assert result.job.proto.type.name == "JOB_TYPE_STREAMING"

    steps = keyed_steps(pipeline.to_runner_api())
    assert steps, "the streaming graph keeps per-key state"
    for label, (coder, key, kinds) in steps.items():
        assert coder == "beam:coder:kv:v1", label
        assert key in DETERMINISTIC_KEY_CODERS, (label, key)
        assert set(kinds) <= PORTABLE_STATE_KINDS, (label, kinds)


@pytest.mark.slow
def test_backfill_pipeline_translates_for_dataflow(tmp_path):
    from qis_beam.pipelines.backfill import build_backfill
    from qis_beam.settings import Settings

    (tmp_path / "packets-0.tfrecord").write_bytes(b"")
    profile = [a for a in profile_args("dataflow", False) if flag_name(a) != "setup_file"]
    pipeline = beam.Pipeline(options=PipelineOptions(merge_args(profile, DRY_RUN_ARGS)))
    build_backfill(pipeline, str(tmp_path / "*.tfrecord"), "gs://qis-dry-run/out", Settings())
    result = pipeline.run()
    assert result.job.proto.type.name == "JOB_TYPE_BATCH"
    for label, (_, key, kinds) in keyed_steps(pipeline.to_runner_api()).items():
        assert key in DETERMINISTIC_KEY_CODERS, (label, key)
        assert set(kinds) <= PORTABLE_STATE_KINDS, (label, kinds)
