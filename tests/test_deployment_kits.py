"""The deployment kits (spec section 9): the Flink compose cluster, Dockerfiles pinning the
versions the profiles name, the scripts, the Dataflow flex-template launcher, and the opt-in
runs on a real Flink (Beam's Flink job-server jar and the stack's session cluster)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import kafka_helpers
import pytest
import yaml
from beam_options import beam_parser

from qis_beam.runners.profiles import (
    BEAM_VERSION,
    FLINK_VERSION,
    PYTHON_VERSION,
    merge_args,
    profile_args,
    profile_options,
)

ROOT = Path(__file__).resolve().parents[1]
FLINK_DIR = ROOT / "runners" / "flink"
DATAFLOW_DIR = ROOT / "runners" / "dataflow"


# --- deployment kits ---------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load((FLINK_DIR / "docker-compose.yaml").read_text())


def from_lines(dockerfile: Path) -> list[str]:
    return [
        line.split()[1]
        for line in dockerfile.read_text().splitlines()
        if line.strip().upper().startswith("FROM ")
    ]


def test_compose_is_a_flink_session_cluster_with_job_server_and_worker_pool():
    compose = load_compose()
    services = compose["services"]
    expected = {"jobmanager", "taskmanager", "job-server", "python-worker-pool", "kafka"}
    assert expected <= set(services)

    flink_image = services["jobmanager"]["image"]
    assert services["taskmanager"]["image"] == flink_image
    assert f":{FLINK_VERSION}-beam{BEAM_VERSION}" in flink_image
    for name in ("jobmanager", "taskmanager"):
        build = services[name]["build"]
        assert (FLINK_DIR / build["context"] / build["dockerfile"]).resolve() == (
            FLINK_DIR / "Dockerfile.flink"
        )
    assert "8081:8081" in services["jobmanager"]["ports"]

    job_server = services["job-server"]
    assert job_server["image"] == f"apache/beam_flink{FLINK_VERSION}_job_server:{BEAM_VERSION}"
    assert "--flink-master=jobmanager:8081" in job_server["command"]
    assert "--job-host=0.0.0.0" in job_server["command"]
    assert "8099:8099" in job_server["ports"]
    # The job server stages artifacts where the task manager reads them.
    staging = "/tmp/beam-artifact-staging"
    assert f"--artifacts-dir={staging}" in job_server["command"]
    volume = next(v for v in job_server["volumes"] if v.endswith(":" + staging))
    assert volume in services["taskmanager"]["volumes"]

    pool = services["python-worker-pool"]
    assert pool["command"] == ["--worker_pool"]
    assert pool["network_mode"] == "service:taskmanager"  # environment_config=localhost:50000
    assert pool["image"].endswith(f":{BEAM_VERSION}")
    assert (FLINK_DIR / pool["build"]["context"]).resolve() == ROOT
    assert (ROOT / pool["build"]["dockerfile"]).resolve() == FLINK_DIR / "Dockerfile.worker"
    assert profile_options("flink", False)["environment_config"] == "localhost:50000"

    for service in services.values():
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image


def test_compose_flink_configuration():
    services = load_compose()["services"]
    conf_text = services["jobmanager"]["environment"]["FLINK_PROPERTIES"]
    assert services["taskmanager"]["environment"]["FLINK_PROPERTIES"] == conf_text
    conf = yaml.safe_load(conf_text)
    assert conf["jobmanager.rpc.address"] == "jobmanager"
    assert conf["state.backend.type"] == "rocksdb"
    assert conf["state.checkpoints.dir"].startswith("file:///flink-data/")
    assert conf["state.savepoints.dir"].startswith("file:///flink-data/")
    assert conf["restart-strategy.type"] in ("fixed-delay", "exponential-delay", "failure-rate")
    assert conf["execution.checkpointing.externalized-checkpoint-retention"] == (
        "RETAIN_ON_CANCELLATION"
    )
    slots = int(conf["taskmanager.numberOfTaskSlots"])
    assert slots >= int(profile_options("flink", False)["parallelism"])
    # Checkpoint storage is shared by job manager and task manager.
    assert "flink-data:/flink-data" in services["jobmanager"]["volumes"]
    assert "flink-data:/flink-data" in services["taskmanager"]["volumes"]


def test_dockerfiles_pin_beam_flink_and_python_versions():
    flink_from = from_lines(FLINK_DIR / "Dockerfile.flink")
    assert f"apache/beam_java17_sdk:{BEAM_VERSION}" in flink_from
    assert any(image.startswith(f"flink:{FLINK_VERSION}-") for image in flink_from)

    worker_image = f"apache/beam_python{PYTHON_VERSION}_sdk:{BEAM_VERSION}"
    assert from_lines(FLINK_DIR / "Dockerfile.worker") == [worker_image]

    dataflow = (DATAFLOW_DIR / "Dockerfile").read_text()
    dataflow_from = from_lines(DATAFLOW_DIR / "Dockerfile")
    assert worker_image in dataflow_from
    launcher = f"python{PYTHON_VERSION.replace('.', '')}-template-launcher-base"
    assert any(launcher in image for image in dataflow_from)
    assert 'FLEX_TEMPLATE_PYTHON_PY_FILE="${WORKDIR}/launch.py"' in dataflow
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dataflow

    expansion = (FLINK_DIR / "Dockerfile.expansion").read_text()
    assert f"beam-sdks-java-io-expansion-service-{BEAM_VERSION}.jar" in expansion

    for dockerfile in (*FLINK_DIR.glob("Dockerfile.*"), DATAFLOW_DIR / "Dockerfile"):
        if dockerfile.suffix == ".dockerignore":
            continue
        for image in from_lines(dockerfile):
            if image.startswith("apache/beam"):
                assert image.endswith(f":{BEAM_VERSION}"), (dockerfile.name, image)


def test_shell_scripts_parse_and_are_executable():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    scripts = [FLINK_DIR / "submit.sh", DATAFLOW_DIR / "launch.sh"]
    for script in scripts:
        subprocess.run([bash, "-n", str(script)], check=True)
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    submit = (FLINK_DIR / "submit.sh").read_text()
    assert f'FLINK_VERSION="{FLINK_VERSION}"' in submit
    assert f'BEAM_VERSION="{BEAM_VERSION}"' in submit


def load_launcher():
    spec = importlib.util.spec_from_file_location("qis_dataflow_launch", DATAFLOW_DIR / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_metadata():
    metadata = json.loads((DATAFLOW_DIR / "metadata.json").read_text())
    names = [p["name"] for p in metadata["parameters"]]
    assert len(names) == len(set(names))
    assert {"input_topic", "output", "window", "allowed_lateness"} <= set(names)
    for parameter in metadata["parameters"]:
        assert parameter["label"] and parameter["helpText"]
        assert parameter.get("isOptional", False) is (
            parameter["name"] not in ("input_topic", "output")
        )
    # Template parameters must not shadow Beam options (they are rewritten to qis-beam flags).
    python_flags = set(beam_parser()._option_string_actions)
    assert not {f"--{n}" for n in names} & python_flags
    assert load_launcher().SWITCHES <= set(names)


def test_launcher_rewrites_template_parameters(monkeypatch):
    launch = load_launcher()
    argv = [
        "--input_topic=projects/p/topics/t",
        "--output",
        "gs://bucket/out",
        "--allowed_lateness=2h",
        "--allow_unsigned=false",
        "--runner=DataflowRunner",
        "--project=p",
        "--temp_location=gs://bucket/tmp",
        "--sdk_container_image=europe-docker.pkg.dev/p/r/qis-beam:1",
    ]
    args = launch.to_cli_args(argv, launch.template_parameters())
    assert args == [
        "--input-topic=projects/p/topics/t",
        "--output=gs://bucket/out",
        "--allowed-lateness=2h",
        "--runner=DataflowRunner",
        "--project=p",
        "--temp_location=gs://bucket/tmp",
        "--sdk_container_image=europe-docker.pkg.dev/p/r/qis-beam:1",
    ]
    assert launch.to_cli_args(["--allow_unsigned=true"], launch.template_parameters()) == [
        "--allow-unsigned"
    ]

    import qis_beam.cli

    calls = []
    monkeypatch.setattr(qis_beam.cli, "main", lambda argv: calls.append(argv) or 0)
    assert launch.main(["--input_topic=projects/p/topics/t", "--output=gs://b/o"]) == 0
    assert calls == [
        [
            "run",
            "--profile",
            "dataflow",
            "--source=pubsub",
            "--input-topic=projects/p/topics/t",
            "--output=gs://b/o",
        ]
    ]


def test_guides_exist():
    guide = (ROOT / "docs" / "runners.md").read_text()
    for needle in ("FnApiRunner", "BundleBasedDirectRunner", "--dry_run", "DaskRunner", "Prism"):
        assert needle in guide
    for readme in (FLINK_DIR / "README.md", DATAFLOW_DIR / "README.md"):
        assert "2.77.0" in readme.read_text()


# --- opt-in: a real Flink ----------------------------------------------------------------
# Beam's Flink 1.19 job-server jar (the ``flink_job_server_jar`` fixture) and the stack's
# Flink session cluster (``flink_stack``). Each pipeline runs in its own process, stopped
# with the job server it starts by its PID.

SUM_PIPELINE = """
import sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

with beam.Pipeline(options=PipelineOptions(sys.argv[1:])) as p:
    totals = p | beam.Create([("a", 1), ("b", 2), ("a", 3)]) | beam.CombinePerKey(sum)
    assert_that(totals, equal_to([("a", 4), ("b", 2)]))
"""


def job_server_jar(request) -> str:
    """The conftest's ``flink_job_server_jar`` fixture, else ``$QIS_FLINK_JOB_SERVER_JAR``."""
    try:
        return str(request.getfixturevalue("flink_job_server_jar"))
    except pytest.FixtureLookupError:
        jar = os.environ.get("QIS_FLINK_JOB_SERVER_JAR")
        if not jar:
            pytest.fail("no flink_job_server_jar fixture and no QIS_FLINK_JOB_SERVER_JAR", False)
        return jar


def run_sum_pipeline(args: list[str], log: Path, timeout: float = 600) -> None:
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SUM_PIPELINE, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        process.wait(timeout)
    finally:
        kafka_helpers.stop(process)  # the launcher's process group, by PID
    assert process.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.flink
def test_flink_embedded_cluster_from_job_server_jar(request, tmp_path):
    """FlinkRunner with an embedded Flink started from the jar (needs Java, no cluster)."""
    args = merge_args(
        profile_args("flink", streaming=False),
        [
            "--flink_master=[local]",
            f"--flink_job_server_jar={job_server_jar(request)}",
            "--environment_type=LOOPBACK",
            "--parallelism=1",
        ],
    )
    run_sum_pipeline(args, tmp_path / "pipeline.log")


@pytest.mark.slow
@pytest.mark.flink
def test_flink_cluster_with_the_flink_profile(request, flink_stack, tmp_path):
    """The ``flink`` profile as on the compose cluster -- the pipeline packed into an uber jar
    and submitted over Flink's REST API, Python user code in an EXTERNAL SDK worker pool --
    against the stack's session cluster, with a worker pool on a free port."""
    from pg_local import free_port

    port = free_port()
    # The pool starts each SDK worker as `python -c ...`: this interpreter first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with open(tmp_path / "worker-pool.log", "w") as out:
        pool = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apache_beam.runners.worker.worker_pool_main",
                f"--service_port={port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": path},
        )
    try:
        explicit = [
            f"--flink_master={flink_stack[1].endpoints['flink_master']}",
            f"--flink_job_server_jar={job_server_jar(request)}",
            f"--environment_config=localhost:{port}",
        ]
        run_sum_pipeline(
            merge_args(profile_args("flink", streaming=False), explicit),
            tmp_path / "pipeline.log",
        )
    finally:
        kafka_helpers.stop(pool)
