"""Beam's Flink job server, assembled from Maven Central into one jar (``stack fetch``).

The released job-server jars (``beam-runners-flink-<minor>-job-server``) are not served where
this project is built, but the runner they are shaded from is: ``beam-runners-flink-1.19``
2.62.0, with ``beam-runners-java-job-service`` and the rest of its closure. Its entry point,
``FlinkJobServerDriver``, is the released jar's main class. Maven resolves the closure, every
jar is checked against ``[flink_job_server.jars]`` (regenerate with
``python -m qis_beam.stack.lock flink_job_server``), and the shade plugin merges them, service
files included, into the jar that ``FlinkRunner --flink_job_server_jar`` starts. It also ships
the job to the cluster, so the task managers need nothing else.

The Python SDK (2.77) talks to it through Beam's portable job API; the pipelines of this
project run on it unchanged (tests/test_flink.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qis_beam.stack.digests import sha256_of, verify
from qis_beam.stack.download import show_progress
from qis_beam.stack.fetch import Fetched, check_locked
from qis_beam.stack.maven import resolve_and_shade
from qis_beam.stack.paths import cache_dir
from qis_beam.stack.pins import pins

NAME = "flink_job_server"
MARKER = ".qis-beam-complete.json"


def _spec() -> dict:
    return pins()[NAME]


def jar_path(cache: Path | None = None) -> Path:
    spec = _spec()
    home = (cache or cache_dir()) / f"flink-job-server-{spec['version']}"
    return home / f"beam-runners-flink-{spec['flink']}-job-server-{spec['version']}.jar"


def _expected(lock: dict[str, str]) -> dict:
    spec = _spec()
    return {"dependencies": spec["dependencies"], "shade": spec["shade_plugin"], "jars": lock}


def _marker(jar: Path) -> dict | None:
    try:
        return json.loads((jar.parent / MARKER).read_text())
    except (OSError, ValueError):
        return None


def cached_jar(cache: Path | None = None) -> Path | None:
    """The assembled jar when a complete one is cached (no hashing: for option defaults)."""
    jar = jar_path(cache)
    marker = _marker(jar)
    if jar.is_file() and marker and marker.get("built_from") == _expected(_spec()["jars"]):
        return jar
    return None


def fetch_job_server(cache: Path | None = None) -> Fetched:
    """Build (once) and verify the job-server jar."""
    spec = _spec()
    lock: dict[str, str] = spec["jars"]
    jar = jar_path(cache)
    marker = _marker(jar)
    if jar.is_file() and marker and marker.get("built_from") == _expected(lock):
        verify(jar, marker["sha256"])  # the cached jar is the one we built
        return Fetched(NAME, jar, False)
    home = jar.parent
    if home.exists():
        shutil.rmtree(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=home.name + ".", dir=home.parent))
    try:
        if show_progress():
            print(
                f"assembling the Flink job server (Beam {spec['version']}) with Maven...",
                file=sys.stderr,
                flush=True,
            )
        built = tmp / jar.name
        jars = resolve_and_shade(
            "Flink job server",
            spec["dependencies"],
            spec["shade_plugin"],
            spec["main_class"],
            tmp / "lib",
            built,
        )
        check_locked(f"Flink job server {spec['version']}", jars, lock, NAME)
        shutil.rmtree(tmp / "lib")  # shaded into the jar; the lock proved what went in
        content = {"built_from": _expected(lock), "sha256": sha256_of(built)}
        (tmp / MARKER).write_text(json.dumps(content, sort_keys=True))
        os.replace(tmp, home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Fetched(NAME, jar, True)
