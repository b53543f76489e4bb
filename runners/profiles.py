"""Runner profiles: named sets of Beam pipeline options behind ``qis-beam ... --profile NAME``.

This module is the single source of truth for the profiles; ``docs/runners.md`` and the
deployment kits in ``runners/flink`` and ``runners/dataflow`` describe them but never repeat
them. A profile's options come first on the command line and any Beam option given explicitly
overrides the profile's option of the same name (:func:`merge_args`).

Every profile has a bounded (``backfill``) and a streaming (``replay``/``run``) variant:

========  ==============================================  =======================================
profile   bounded (streaming=False)                       streaming (streaming=True)
========  ==============================================  =======================================
direct    FnApiRunner                                     BundleBasedDirectRunner ``--streaming``
portable  PortableRunner ``--job_endpoint=embed`` LOOPBACK  not available (TestStream is rejected)
flink     FlinkRunner on the compose cluster, uber jar,   + ``--streaming``, checkpoints every 60 s,
          EXTERNAL worker pool ``localhost:50000``        retained on cancel, max_parallelism 128
dataflow  DataflowRunner, Runner v2, throughput           + ``--streaming``
          autoscaling, ``--setup_file``                   ``--enable_streaming_engine``
local-    FlinkRunner on ``qis-beam stack``'s Flink       + ``--streaming``, checkpoints every
flink     (REST port from the stack's state file),        10 s, retained on cancel,
          LOOPBACK, Java 17 ``--add-opens`` job server    max_parallelism 128
local-    PortableRunner to ``qis-beam stack``'s Prism    + ``--streaming``
prism     job endpoint, LOOPBACK
========  ==============================================  =======================================

The ``local-*`` profiles read the running stack (``$QIS_STACK_DIR`` or
``~/.local/state/qis-beam/stack``) each time they are resolved; with no stack running they
leave the endpoint out and :func:`missing_options` asks for it. ``local-flink`` takes the Beam
Flink job-server jar from an explicit ``--flink_job_server_jar``, ``$QIS_FLINK_JOB_SERVER_JAR``,
or the one ``qis-beam stack fetch`` assembled (Beam 2.62.0 for Flink 1.19: the released jars
are not served here, see ``qis_beam/stack/jobserver.py``).

What a profile never contains: values only the user knows (``--project``,
``--temp_location``, buckets, topics, ``--job_name``). :data:`REQUIRED_OPTIONS` lists them and
:func:`missing_options` reports the ones absent from a command line.

Options the Python SDK does not define: the Flink runner's own options (checkpointing,
savepoints, state backend, ...) are defined by the Java ``FlinkPipelineOptions`` and reach
the runner only as pass-through flags (the Flink job server describes them to the SDK at
submission, and the uber-jar path forwards unknown flags verbatim). :data:`FLINK_RUNNER_OPTIONS`
lists the ones that exist; :func:`unrecognized_args` is a Beam-argument check that accepts
them and nothing else unknown.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from qis_beam.beam_internals import option_dest, pipeline_option_parser
from qis_beam.stack.pins import pins

__all__ = [
    "BEAM_VERSION",
    "FLINK_VERSION",
    "LOCAL_FLINK_VERSION",
    "PYTHON_VERSION",
    "PROFILES",
    "PROFILE_NAMES",
    "BATCH_OPTIONS",
    "STREAMING_OPTIONS",
    "BOUNDED_ONLY",
    "REQUIRED_OPTIONS",
    "FLINK_RUNNER_OPTIONS",
    "UnknownProfile",
    "profile_options",
    "profile_args",
    "merge_args",
    "missing_options",
    "unrecognized_args",
]

#: The Beam release every image and jar in the deployment kits is pinned to.
BEAM_VERSION = "2.77.0"
#: Flink minor version of the compose cluster, its job-server image and ``--flink_version``.
#: Beam 2.77 publishes job servers for 1.19, 1.20, 2.0, 2.1 and 2.2; 1.20 is Flink's 1.x LTS.
FLINK_VERSION = "1.20"
#: Flink minor version of ``qis-beam stack``'s cluster and of the job server it assembles.
LOCAL_FLINK_VERSION: str = pins()["flink"]["minor"]
#: Python minor version of the SDK worker images; the launching interpreter must match it.
PYTHON_VERSION = "3.11"

# The checkout's setup.py (``runners/`` sits at the repository root; an editable install maps
# ``qis_beam.runners`` to it). Absent from an installed wheel, where workers get the code from a
# container.
_SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"

#: Options of each profile in every mode.
PROFILES: dict[str, dict[str, object]] = {
    "direct": {
        # Always a named local runner: a bare DirectRunner first tries to download Prism.
        "runner": "FnApiRunner",
    },
    "portable": {
        # The Job API path FlinkRunner uses, with an in-process job service and SDK worker.
        "runner": "PortableRunner",
        "job_endpoint": "embed",
        "environment_type": "LOOPBACK",
    },
    "flink": {
        # The session cluster of runners/flink/docker-compose.yaml (REST port 8081).
        "runner": "FlinkRunner",
        "flink_master": "localhost:8081",
        "flink_version": FLINK_VERSION,
        # Package pipeline + artifacts into a jar and upload it over Flink's REST API: needs the
        # job-server jar on the launching machine but no Java there and no artifact directory
        # shared with the task managers. Ignored when --flink_master=[local].
        "flink_submit_uber_jar": True,
        "parallelism": 2,
        # Python user code runs in the SDK worker pool beside each task manager; the address
        # is resolved by the task manager (the pool shares its network namespace).
        "environment_type": "EXTERNAL",
        "environment_config": "localhost:50000",
    },
    "dataflow": {
        "runner": "DataflowRunner",
        "region": "us-central1",  # a default; pass --region to use another
        # Runner v2 is Dataflow's default for Python; naming it keeps old projects on it too.
        "experiments": ["use_runner_v2"],
        "autoscaling_algorithm": "THROUGHPUT_BASED",
        "max_num_workers": 10,
        # Workers install this package from an sdist of the checkout. Without a checkout (an
        # installed wheel, the flex-template image) use --sdk_container_image instead.
        **({"setup_file": str(_SETUP_PY)} if _SETUP_PY.is_file() else {}),
    },
}

# On Java 17 the Flink job server needs these (Beam's own flink_runner_test.py passes them).
_JAVA17_JOB_SERVER_OPENS = [
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
]

PROFILES["local-flink"] = {
    # `qis-beam stack up --only flink`: a session cluster on 127.0.0.1 (1 TaskManager, 2 slots).
    # The job server runs beside the submitter and talks to the cluster's REST port; no uber
    # jar is needed because job server, task manager and artifacts share one machine.
    "runner": "FlinkRunner",
    "flink_version": LOCAL_FLINK_VERSION,
    "parallelism": 2,
    # The SDK harness runs in the submitting process: no Docker, no worker pool.
    "environment_type": "LOOPBACK",
    "job_server_jvm_properties": _JAVA17_JOB_SERVER_OPENS,
}
PROFILES["local-prism"] = {
    # `qis-beam stack up --only prism`: Beam's Go runner as a long-lived job service.
    "runner": "PortableRunner",
    "environment_type": "LOOPBACK",
    # Prism may split a stateful bundle while it runs, so one key runs in two bundles at once
    # and a state write is lost (apache/beam#35771): never split.
    "experiments": ["prism_disable_sdf_split"],
}

#: Profile names in display order (for argparse ``choices``).
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)

# Batch on Flink: blocking data exchange. Pipelined batch exchanges can deadlock on graphs whose
# branches rejoin (FLINK-10672), as the dead-letter Flatten does. Each bundle (a whole partition
# in batch) takes whichever SDK worker is free: without load balancing a task keeps the worker
# Flink dealt it round-robin when the task opened, and under concurrent task starts both
# subtasks of the heaviest stage often got the same one (one core for a parallelism-2 stage).
# Balancing needs BATCH_FORCED: a bundle holds its worker to the end, so a producer and its
# pipelined consumer could each wait for the other's worker. Never in streaming.
_FLINK_BATCH = {"execution_mode_for_batch": "BATCH_FORCED", "load_balance_bundles": True}

#: Extra options for bounded pipelines (``backfill``).
BATCH_OPTIONS: dict[str, dict[str, object]] = {
    "flink": dict(_FLINK_BATCH),
    "local-flink": dict(_FLINK_BATCH),
}

#: Extra options for streaming pipelines (``replay``, ``run``); they override PROFILES.
STREAMING_OPTIONS: dict[str, dict[str, object]] = {
    "direct": {
        # TestStream needs the bundle-based runner; FnApiRunner cannot hold watermarks.
        "runner": "BundleBasedDirectRunner",
        "streaming": True,
    },
    "flink": {
        "streaming": True,
        # Fixed at a job's first start; savepoints restore only with the same value.
        "max_parallelism": 128,
        # Flink runner (Java) options, see FLINK_RUNNER_OPTIONS. Checkpoint mode defaults to
        # EXACTLY_ONCE; state backend and restart strategy come from the cluster configuration.
        "checkpointing_interval": 60_000,
        "externalized_checkpoints_enabled": True,
        "retain_externalized_checkpoints_on_cancellation": True,
        # A bundle still open at a checkpoint barrier is otherwise finished inside the
        # snapshot, its output kept in operator state until the stage's next element or
        # watermark. The Kafka read's first stage (Impulse -> ListPartitions) gets neither,
        # so a first checkpoint during its first bundle stalled the job for good (Beam's
        # DoFnOperator; with checkpoints every 300 ms: 3 stalls in 3 starts, 0 in 3 with this).
        "finish_bundle_before_checkpointing": True,
    },
    "dataflow": {
        "streaming": True,
        "enable_streaming_engine": True,
    },
    "local-flink": {
        "streaming": True,
        "max_parallelism": 128,
        # Short interval: the local recovery test restores from a checkpoint seconds old.
        "checkpointing_interval": 10_000,
        "externalized_checkpoints_enabled": True,
        "retain_externalized_checkpoints_on_cancellation": True,
        "finish_bundle_before_checkpointing": True,  # see "flink"
    },
    "local-prism": {
        "streaming": True,
    },
}

#: Profiles that cannot run the streaming pipeline at all.
BOUNDED_ONLY: dict[str, str] = {
    "portable": (
        "PortableRunner with --job_endpoint=embed runs bounded pipelines only "
        "(it rejects TestStream); use --profile direct for replay"
    ),
}

#: Options a profile cannot know; the user must pass them (flag names, without ``--``).
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "direct": (),
    "portable": (),
    "flink": (),
    "dataflow": ("project", "temp_location"),
    # Filled in from the running stack and $QIS_FLINK_JOB_SERVER_JAR when they exist.
    "local-flink": ("flink_master", "flink_job_server_jar"),
    "local-prism": ("job_endpoint",),
}

#: Flink runner options defined by the Java ``FlinkPipelineOptions`` of Beam, in the spelling
#: the Python SDK forwards (Beam's "Pipeline options for the Flink Runner" table). The Python
#: SDK does not parse them; the runner does. Options Python knows (flink_master, parallelism,
#: max_parallelism, ...) are not repeated here.
FLINK_RUNNER_OPTIONS: frozenset[str] = frozenset(
    {
        "allow_non_restored_state",
        "auto_balance_write_files_sharding_enabled",
        "auto_watermark_interval",
        "checkpoint_timeout_millis",
        "checkpointing_interval",
        "checkpointing_mode",
        "disable_metrics",
        "execution_mode_for_batch",
        "execution_retry_delay",
        "externalized_checkpoints_enabled",
        "fail_on_checkpointing_errors",
        "faster_copy",
        "finish_bundle_before_checkpointing",
        "flink_conf_dir",
        "latency_tracking_interval",
        "load_balance_bundles",
        "max_bundle_size",
        "max_bundle_time_mills",
        "min_pause_between_checkpoints",
        "num_concurrent_checkpoints",
        "number_of_execution_retries",
        "object_reuse",
        "operator_chaining",
        "re_iterable_group_by_key_result",
        "report_checkpoint_duration",
        "retain_externalized_checkpoints_on_cancellation",
        "savepoint_path",
        "shutdown_sources_after_idle_ms",
        "state_backend",
        "state_backend_factory",
        "state_backend_storage_path",
    }
)


class UnknownProfile(KeyError, ValueError):
    """An unknown profile name; catch it as ``KeyError`` or ``ValueError``."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def profile_options(name: str, streaming: bool) -> dict[str, object]:
    """The options of profile ``name`` for a streaming or bounded pipeline, as a dict."""
    if name not in PROFILES:
        raise UnknownProfile(
            f"unknown runner profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}"
        )
    if streaming and name in BOUNDED_ONLY:
        raise ValueError(f"profile {name!r} cannot run a streaming pipeline: {BOUNDED_ONLY[name]}")
    extra = STREAMING_OPTIONS if streaming else BATCH_OPTIONS
    return {**PROFILES[name], **extra.get(name, {}), **_local_stack_options(name, streaming)}


def _stack_endpoint(piece: str, key: str) -> str | None:
    """An endpoint of the user's running ``qis-beam stack`` (None when not running)."""
    from qis_beam.stack.control import endpoint
    from qis_beam.stack.paths import default_state_dir

    try:
        return endpoint(default_state_dir(), piece, key)
    except (OSError, ValueError, KeyError):  # an unreadable state file is no stack
        return None


def _fetched_job_server_jar() -> str | None:
    """The job-server jar ``qis-beam stack fetch`` assembled, when it is in the cache."""
    from qis_beam.stack.jobserver import cached_jar

    jar = cached_jar()
    return str(jar) if jar else None


def _local_stack_options(name: str, streaming: bool) -> dict[str, object]:
    """Options the ``local-*`` profiles read from the machine when they are resolved."""
    options: dict[str, object] = {}
    if name == "local-flink":
        master = _stack_endpoint("flink", "flink_master")
        if master:
            options["flink_master"] = master
        pool = None if streaming else _stack_endpoint("flink", "sdk_worker_pool")
        if pool:
            options.update(pool_options(pool))
        jar = os.environ.get("QIS_FLINK_JOB_SERVER_JAR") or _fetched_job_server_jar()
        if jar:
            options["flink_job_server_jar"] = jar
    elif name == "local-prism":
        job_endpoint = _stack_endpoint("prism", "job_endpoint")
        if job_endpoint:
            options["job_endpoint"] = job_endpoint
    return options


def pool_options(pool: str) -> dict[str, object]:
    """Batch jobs on the stack's cluster run their Python in its SDK worker pool, one worker
    process per slot, so a job at parallelism 2 uses both cores (LOOPBACK runs every bundle in
    the submitting process, on one core). Streaming jobs stay on LOOPBACK: with per-packet
    keyed state they ran 1.4x faster in one process than across the pool's workers."""
    from qis_beam.stack.flink import SLOTS_PER_TASKMANAGER

    return {
        "environment_type": "EXTERNAL",
        "environment_config": pool,
        "sdk_worker_parallelism": SLOTS_PER_TASKMANAGER,
    }


def pool_args(pool: str) -> list[str]:
    """:func:`pool_options` as ``--flag=value`` arguments."""
    return _format(pool_options(pool))


def _format(options: Mapping[str, object]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            args.extend(f"--{key}={item}" for item in value)
        else:
            args.append(f"--{key}={value}")
    return args


def profile_args(name: str, streaming: bool) -> list[str]:
    """Profile ``name`` as ``--flag=value`` strings (booleans as bare ``--flag``).

    Raises :class:`UnknownProfile` (a ``KeyError`` and a ``ValueError``) for an unknown name
    and ``ValueError`` for a bounded-only profile asked for a streaming pipeline.
    """
    return _format(profile_options(name, streaming))


def _dest(token: str) -> str | None:
    """The option a ``--flag[=value]`` token sets (aliases resolved), or None for a value."""
    if not token.startswith("--") or token == "--":
        return None
    flag = token.split("=", 1)[0]
    return option_dest(flag) or flag[2:].replace("-", "_")


#: Overriding the key also drops these profile options (they only make sense with the
#: profile's value): an explicit ``--environment_type=LOOPBACK`` must not inherit the
#: profile's ``--environment_config=localhost:50000`` (Beam rejects that combination).
_COUPLED: dict[str, frozenset[str]] = {
    "environment_type": frozenset({"environment_config", "environment_options"}),
}


def merge_args(profile: Sequence[str], explicit: Sequence[str]) -> list[str]:
    """Profile arguments followed by the explicit ones, minus profile flags set explicitly.

    A flag counts as the same when it sets the same Beam option, so ``--experiment=x``
    replaces the profile's ``--experiments=...`` and ``--runner X`` (two tokens) replaces
    ``--runner=...``. An explicit ``--environment_type`` also drops the profile's
    ``--environment_config``. Explicit arguments are kept verbatim and in order. ``profile``
    must be one-token flags, as :func:`profile_args` returns.
    """
    overridden = {d for d in map(_dest, explicit) if d is not None}
    for dest in list(overridden):
        overridden |= _COUPLED.get(dest, frozenset())
    kept = [arg for arg in profile if _dest(arg) not in overridden]
    return kept + list(explicit)


def missing_options(name: str, args: Iterable[str]) -> list[str]:
    """Required options of profile ``name`` (flag names) that ``args`` does not set."""
    if name not in REQUIRED_OPTIONS:
        raise UnknownProfile(
            f"unknown runner profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}"
        )
    given = {d for d in map(_dest, args) if d is not None}
    return [option for option in REQUIRED_OPTIONS[name] if option not in given]


def unrecognized_args(args: Sequence[str]) -> list[str]:
    """The arguments that are neither Beam (Python SDK) options nor Flink runner options.

    Raises ``ValueError`` when a known Beam option has a bad value (e.g. an unknown
    ``--flink_version``). A Flink runner option given as two tokens takes its value along.
    """
    try:
        _, unknown = pipeline_option_parser().parse_known_args(list(args))
    except SystemExit:
        raise ValueError(f"bad Beam pipeline option value in: {' '.join(args)}") from None
    rest: list[str] = []
    i = 0
    while i < len(unknown):
        token = unknown[i]
        dest = _dest(token)
        if dest in FLINK_RUNNER_OPTIONS:
            has_value = "=" in token
            if not has_value and i + 1 < len(unknown) and not unknown[i + 1].startswith("-"):
                i += 1  # its value
        else:
            rest.append(token)
        i += 1
    return rest
