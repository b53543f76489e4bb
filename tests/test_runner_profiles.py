"""Runner profiles (spec section 9), offline.

Every profile flag is a Beam 2.77 option (or a real Flink runner option that Beam forwards),
the override rules, and the profiles that can run here do run (FnApiRunner,
BundleBasedDirectRunner + TestStream, PortableRunner embed, DataflowRunner dry run). The kits
are tested in test_deployment_kits.py, the Dataflow translation in test_dataflow_translation.py.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions,
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
)
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.transforms import window
from beam_options import DRY_RUN_ARGS, beam_parser, flag_name, flag_value, parse_beam
from google.protobuf import json_format

from qis_beam.runners.profiles import (
    BEAM_VERSION,
    BOUNDED_ONLY,
    FLINK_RUNNER_OPTIONS,
    FLINK_VERSION,
    PROFILE_NAMES,
    PYTHON_VERSION,
    merge_args,
    missing_options,
    profile_args,
    profile_options,
    unrecognized_args,
)

ROOT = Path(__file__).resolve().parents[1]

MODES = [
    (name, streaming)
    for name in PROFILE_NAMES
    for streaming in (False, True)
    if not (streaming and name in BOUNDED_ONLY)
]
MODE_IDS = [f"{name}-{'streaming' if streaming else 'batch'}" for name, streaming in MODES]


# --- the profiles ------------------------------------------------------------------------


def test_profile_names_and_pinned_versions(capsys):
    from qis_beam.cli import main

    with pytest.raises(SystemExit):
        main(["backfill", "--help"])
    offered = " ".join(capsys.readouterr().out.split())
    assert f"--profile {{{','.join(PROFILE_NAMES)}}}" in offered  # the CLI offers every profile
    assert BEAM_VERSION == beam.__version__
    assert FLINK_VERSION in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert PYTHON_VERSION.count(".") == 1


@pytest.mark.parametrize(("name", "streaming"), MODES, ids=MODE_IDS)
def test_every_flag_is_a_beam_option_or_a_flink_runner_option(name, streaming):
    args = profile_args(name, streaming)
    assert args, "a profile names at least its runner"
    assert all(arg.startswith("--") and " " not in arg for arg in args)
    # No flag twice, except list options (local-flink's three --job_server_jvm_properties).
    assert len(set(args)) == len(args)
    assert len({flag_name(a) for a in args}) == len(args) - sum(
        1 for a in args if flag_name(a) == "job_server_jvm_properties"
    ) + any(flag_name(a) == "job_server_jvm_properties" for a in args)

    python_side = [a for a in args if flag_name(a) not in FLINK_RUNNER_OPTIONS]
    runner_side = [a for a in args if flag_name(a) in FLINK_RUNNER_OPTIONS]
    known, unknown = parse_beam(python_side)
    assert unknown == []
    assert known["runner"] == profile_options(name, streaming)["runner"]
    assert bool(known["streaming"]) is streaming
    # Runner-side flags are Flink's own; Beam itself does not know them.
    if name not in ("flink", "local-flink"):
        assert runner_side == []
    assert parse_beam(runner_side)[1] == runner_side
    assert unrecognized_args(args) == []


def test_flink_runner_options_are_not_python_sdk_options():
    python_flags = set(beam_parser()._option_string_actions)
    assert not {f"--{name}" for name in FLINK_RUNNER_OPTIONS} & python_flags
    assert all(name == name.lower() and " " not in name for name in FLINK_RUNNER_OPTIONS)


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_direct_profile_runs_in_process_without_downloads(streaming):
    """Never the bare DirectRunner, which fetches a Prism binary (beam-facts.md)."""
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.runners.runner import create_runner

    options = PipelineOptions(profile_args("direct", streaming))
    runner = create_runner(options.view_as(StandardOptions).runner)
    assert isinstance(runner, BundleBasedDirectRunner if streaming else FnApiRunner)
    assert bool(options.view_as(StandardOptions).streaming) is streaming


def test_portable_profile_is_bounded_only(capsys):
    from qis_beam.cli import main

    portable = PipelineOptions(profile_args("portable", streaming=False)).view_as(PortableOptions)
    # The Job API in this process, workers in this process: no job server, no Docker.
    assert portable.job_endpoint == "embed" and portable.environment_type == "LOOPBACK"
    with pytest.raises(ValueError, match="bounded pipelines only"):
        profile_args("portable", streaming=True)
    assert main(["replay", "--input", "x", "--output", "y", "--profile", "portable"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qis-beam replay: ") and "bounded pipelines only" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("profile", ["flink", "local-flink"])
def test_flink_streaming_ends_bundles_before_checkpoint_barriers(profile):
    """A bundle finished inside a snapshot keeps its output in operator state until the stage
    sees another element or watermark, which the Kafka read's first stage never does."""
    assert "--finish_bundle_before_checkpointing" in profile_args(profile, streaming=True)
    assert "--finish_bundle_before_checkpointing" not in profile_args(profile, streaming=False)


def test_flink_profile_batch_and_streaming():
    batch = profile_args("flink", streaming=False)
    stream = profile_args("flink", streaming=True)
    for args in (batch, stream):
        options = PipelineOptions(args)
        flink = options.view_as(FlinkRunnerOptions)
        portable = options.view_as(PortableOptions)
        assert options.view_as(StandardOptions).runner == "FlinkRunner"
        assert flink.flink_master == "localhost:8081"
        assert flink.flink_version == FLINK_VERSION
        assert flink.flink_submit_uber_jar is True
        assert flink.parallelism > 0
        assert (portable.environment_type, portable.environment_config) == (
            "EXTERNAL",
            "localhost:50000",
        )
        assert flink.flink_job_server_jar is None  # a path only the user knows
    # Streaming-only: checkpoints and --streaming; batch-only: blocking exchanges.
    assert "--streaming" not in batch and "--streaming" in stream
    assert flag_value(batch, "checkpointing_interval") is None
    assert int(flag_value(stream, "checkpointing_interval")) > 0
    assert flag_value(stream, "max_parallelism") == "128"
    assert flag_value(batch, "execution_mode_for_batch") == "BATCH_FORCED"
    assert flag_value(stream, "execution_mode_for_batch") is None
    # bundles take a free SDK worker in batch only (safe with blocking exchanges alone)
    assert "--load_balance_bundles" in batch and "--load_balance_bundles" not in stream


@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_flink_runner_options_reach_the_submitted_options(streaming):
    """Both submission paths hand the Flink runner options to the runner."""
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    class JobService:
        def __init__(self, described=()):
            self.described = list(described)

        def DescribePipelineOptions(self, request, timeout=None):  # the gRPC method name
            return beam_job_api_pb2.DescribePipelineOptionsResponse(options=self.described)

    args = profile_args("flink", streaming)
    runner_side = {flag_name(a) for a in args if flag_name(a) in FLINK_RUNNER_OPTIONS}
    assert runner_side
    options = PipelineOptions(args)

    def submitted(handle) -> dict:
        struct = handle.get_pipeline_options()
        return {
            k[len("beam:option:") : -len(":v1")]: v
            for k, v in json_format.MessageToDict(struct).items()
        }

    # The profile's path (--flink_submit_uber_jar): unknown flags are retained verbatim.
    handle = FlinkRunner().create_job_service_handle(JobService(), options)
    sent = submitted(handle)
    assert runner_side <= set(sent)
    assert sent["flink_version"] == FLINK_VERSION and sent["environment_type"] == "EXTERNAL"
    # The job-server path: the job server describes its options, which are then sent.
    types = beam_job_api_pb2.PipelineOptionType
    described = [
        beam_job_api_pb2.PipelineOptionDescriptor(
            name=name,
            type=types.STRING
            if "=" in next(a for a in args if flag_name(a) == name)
            else types.BOOLEAN,
            description=name,
            default_value="false",
        )
        for name in runner_side
    ]
    handle = JobServiceHandle(JobService(described), options, retain_unknown_options=False)
    assert runner_side <= set(submitted(handle))
    if streaming:
        assert sent["checkpointing_interval"] == flag_value(args, "checkpointing_interval")


def test_dataflow_profile_leaves_user_values_out():
    for streaming in (False, True):
        options = profile_options("dataflow", streaming)
        args = profile_args("dataflow", streaming)
        gcp = PipelineOptions(args).view_as(GoogleCloudOptions)
        assert gcp.project is None and gcp.temp_location is None and gcp.staging_location is None
        assert gcp.job_name is None
        assert gcp.region == options["region"]
        assert not any("gs://" in a for a in args)
        assert "use_runner_v2" in PipelineOptions(args).view_as(DebugOptions).experiments
        setup_file = PipelineOptions(args).view_as(SetupOptions).setup_file
        assert setup_file in (None, str(ROOT / "setup.py"))
    assert "--enable_streaming_engine" in profile_args("dataflow", streaming=True)
    assert "--enable_streaming_engine" not in profile_args("dataflow", streaming=False)


def test_dataflow_profile_asks_for_the_users_values(capsys):
    """Through the CLI: what only the user knows is asked for, in one line (exit 2)."""
    from qis_beam.cli import main

    base = ["run", "--input-topic", "projects/qis-dry-run/topics/t", "--output", "gs://b/o"]
    assert main([*base, "--profile", "dataflow"]) == 2
    err = capsys.readouterr().err
    assert err == "qis-beam run: --profile dataflow needs --project, --temp_location\n"
    assert main([*base, "--profile", "dataflow", "--project", "qis-dry-run"]) == 2
    assert capsys.readouterr().err.endswith("needs --temp_location\n")


def test_profile_composes_with_switch_written_beam_options():
    """``--dry_run`` takes a value in Beam; written as a switch, it survives the merge."""
    from apache_beam.options.pipeline_options import TestOptions

    from qis_beam.cli.beamargs import beam_args
    from qis_beam.jobs import is_dry_run

    explicit = ["--dry_run", "--project", "qis-dry-run", "--temp_location", "gs://qis-dry-run/t"]
    for streaming in (False, True):
        merged = beam_args("dataflow", explicit, streaming)
        options = PipelineOptions(merged)
        assert is_dry_run(options) and options.view_as(TestOptions).dry_run == "True"
        assert options.view_as(GoogleCloudOptions).project == "qis-dry-run"
        assert options.view_as(StandardOptions).runner == "DataflowRunner"


@pytest.mark.parametrize(("name", "streaming"), MODES, ids=MODE_IDS)
def test_no_profile_invents_user_values(name, streaming):
    args = profile_args(name, streaming)
    invented = {"project", "temp_location", "staging_location", "job_name", "sdk_container_image"}
    assert not {flag_name(a) for a in args} & invented


@pytest.mark.parametrize("bad", ["nope", "Flink", "", "dask"])
def test_unknown_profile_is_a_clear_key_and_value_error(bad):
    for error in (KeyError, ValueError):
        with pytest.raises(error) as raised:
            profile_args(bad, streaming=False)
        message = str(raised.value)
        assert (
            message.startswith("unknown runner profile")
            and "direct, portable, flink, dataflow" in message
        )
    with pytest.raises(KeyError):
        missing_options(bad, [])


# --- merging ---------------------------------------------------------------------------


def test_merge_without_explicit_args_is_the_profile():
    for name, streaming in MODES:
        args = profile_args(name, streaming)
        assert merge_args(args, []) == args


def test_explicit_flag_overrides_the_profile_flag():
    profile = profile_args("flink", streaming=True)
    merged = merge_args(profile, ["--parallelism=8", "--checkpointing_interval=5000"])
    assert flag_value(merged, "parallelism") == "8"
    assert [a for a in merged if flag_name(a) == "parallelism"] == ["--parallelism=8"]
    assert [a for a in merged if flag_name(a) == "checkpointing_interval"] == [
        "--checkpointing_interval=5000"
    ]
    # Untouched profile flags stay, in order, before the explicit ones.
    rest = [a for a in profile if flag_name(a) not in ("parallelism", "checkpointing_interval")]
    assert merged == rest + ["--parallelism=8", "--checkpointing_interval=5000"]
    assert PipelineOptions(merged).view_as(FlinkRunnerOptions).parallelism == 8


def test_two_token_and_alias_forms_override():
    profile = profile_args("dataflow", streaming=False)
    explicit = [
        "--runner",
        "DataflowRunner",
        "--experiment=enable_hot_key_logging",
        "--region",
        "eu",
    ]
    merged = merge_args(profile, explicit)
    assert merged[-len(explicit) :] == explicit
    assert "--runner=DataflowRunner" not in merged
    assert "--experiments=use_runner_v2" not in merged  # --experiment sets the same option
    assert "--region=us-central1" not in merged
    options = PipelineOptions(merged)
    assert options.view_as(GoogleCloudOptions).region == "eu"
    assert options.view_as(DebugOptions).experiments == ["enable_hot_key_logging"]


def test_explicit_environment_type_drops_the_profile_environment_config():
    merged = merge_args(profile_args("flink", streaming=False), ["--environment_type=LOOPBACK"])
    assert flag_value(merged, "environment_config") is None
    portable = PipelineOptions(merged).view_as(PortableOptions)
    assert portable.environment_type == "LOOPBACK" and portable.environment_config is None
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    validator = PipelineOptionsValidator(PipelineOptions(merged), runner=None)
    assert validator.validate_environment_options(portable) == []


def test_explicit_runner_replaces_runner_only():
    merged = merge_args(profile_args("flink", streaming=False), ["--runner=PortableRunner"])
    options = PipelineOptions(merged)
    assert options.view_as(StandardOptions).runner == "PortableRunner"
    assert options.view_as(PortableOptions).environment_config == "localhost:50000"


def test_missing_required_options():
    assert missing_options("dataflow", []) == ["project", "temp_location"]
    assert missing_options("dataflow", ["--project", "p", "--temp_location=gs://x/t"]) == []
    assert missing_options("dataflow", ["--project=p"]) == ["temp_location"]
    assert missing_options("flink", []) == []


def test_unrecognized_args_accepts_beam_and_flink_runner_options_only():
    ok = [
        "--runner=FlinkRunner",
        "--savepoint_path",
        "file:///flink-data/savepoints/sp-1",
        "--allow_non_restored_state",
        "--state_backend=rocksdb",
        "--job_name",
        "qis-run",
    ]
    assert unrecognized_args(ok) == []
    assert unrecognized_args(["--checkpointing_intervall=5", "--project=p"]) == [
        "--checkpointing_intervall=5"
    ]
    with pytest.raises(ValueError, match="bad Beam pipeline option"):
        unrecognized_args(["--flink_version=0.9"])


# --- the profiles run where they can run here ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "streaming"])
def test_dataflow_profile_translates_offline(streaming):
    # --setup_file is left out: staging would build an sdist inside the checkout.
    profile = [a for a in profile_args("dataflow", streaming) if flag_name(a) != "setup_file"]
    options = PipelineOptions(merge_args(profile, DRY_RUN_ARGS))
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | beam.Create([("a", 1), ("b", 2)])
        | beam.WindowInto(window.FixedWindows(60))
        | beam.CombinePerKey(sum)
    )
    result = pipeline.run()
    job = result.job
    assert job.proto.type.name == ("JOB_TYPE_STREAMING" if streaming else "JOB_TYPE_BATCH")
    experiments = set(job.options.view_as(DebugOptions).experiments)
    assert "use_runner_v2" in experiments
    assert ("enable_streaming_engine" in experiments) is streaming
