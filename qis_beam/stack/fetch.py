"""``qis-beam stack fetch``: download, verify and assemble every pinned engine into the cache.

Each ``fetch_*`` returns the ready directory (or binary) and is idempotent: what is cached is
re-verified against ``pins.toml`` and reused, so a second fetch touches no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qis_beam.stack.digests import DigestMismatch, sha256_of, verify
from qis_beam.stack.download import fetch_file, show_progress
from qis_beam.stack.maven import resolve_jars
from qis_beam.stack.paths import cache_dir
from qis_beam.stack.pins import pins

#: Written last into an assembled directory: what it was built from (a half-built directory
#: from an interrupted fetch has no marker and is rebuilt).
MARKER = ".qis-beam-complete.json"


class FetchError(Exception):
    """An artifact could not be fetched; the message is one line."""


@dataclass
class Fetched:
    name: str
    path: Path
    downloaded: bool  # False: everything came from the verified cache
    note: str = ""


def _marker_ok(directory: Path, expected: dict) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _write_marker(directory: Path, content: dict) -> None:
    (directory / MARKER).write_text(json.dumps(content, sort_keys=True))


# --- Flink --------------------------------------------------------------------------------


def flink_home(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"flink-{pins()['flink']['version']}"


def fetch_flink(cache: Path | None = None) -> Fetched:
    """Flink's binary distribution, rebuilt from PyPI's two Flink files.

    ``apache-flink-libraries`` (sdist) carries ``lib/``, ``opt/`` and ``plugins/`` under
    ``deps/``; the ``apache-flink`` wheel carries ``bin/*.sh`` and ``conf/``. The
    ``apache-flink`` package is never installed (it pins an old apache-beam).
    """
    cache = cache or cache_dir()
    spec = pins()["flink"]
    files = {f["role"]: f for f in spec["files"]}
    downloaded = False
    local = {}
    for role, f in files.items():
        dest = cache / "downloads" / f["name"]
        downloaded |= fetch_file(f["url"], dest, f["sha256"], f.get("size"))
        local[role] = dest
    home = flink_home(cache)
    expected = {role: f["sha256"] for role, f in files.items()}
    if _marker_ok(home, expected):
        return Fetched("flink", home, downloaded)
    if home.exists():
        shutil.rmtree(home)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=home.name + ".", dir=cache))
    try:
        prefix_depth = 2  # <sdist-name>/deps/<...>
        with tarfile.open(local["libraries"]) as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) > prefix_depth and parts[1] == "deps":
                    member.name = str(Path(*parts[prefix_depth:]))
                    members.append(member)
            tar.extractall(tmp, members=members, filter="data")
        with zipfile.ZipFile(local["scripts"]) as wheel:
            for name in wheel.namelist():
                parts = Path(name).parts
                if parts[:2] in (("pyflink", "bin"), ("pyflink", "conf")) and len(parts) == 3:
                    target = tmp / parts[1] / parts[2]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(wheel.read(name))
        for script in (tmp / "bin").iterdir():
            if script.suffix == ".sh" or script.name in ("flink", "pyflink-shell.sh"):
                script.chmod(0o755)
        for needed in ("bin/jobmanager.sh", "bin/taskmanager.sh", "conf/config.yaml"):
            if not (tmp / needed).is_file():
                raise FetchError(f"Flink {spec['version']}: the PyPI files lack {needed}")
        if not list((tmp / "lib").glob("flink-dist*.jar")):
            raise FetchError(
                f"Flink {spec['version']}: no lib/flink-dist*.jar in {local['libraries']}"
            )
        _write_marker(tmp, expected)
        os.replace(tmp, home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Fetched("flink", home, True)


# --- Kafka --------------------------------------------------------------------------------


def check_locked(label: str, jars: list[Path], lock: dict[str, str], section: str) -> None:
    """``jars`` are exactly the jars of the lock ``[section.jars]``, each with its digest."""
    got = {p.name for p in jars}
    if got != set(lock):
        extra, missing = sorted(got - set(lock)), sorted(set(lock) - got)
        raise FetchError(
            f"{label}: resolved jars differ from the lock in pins.toml (unexpected {extra}, "
            f"missing {missing}); regenerate with `python -m qis_beam.stack.lock {section}`"
        )
    for jar in jars:
        verify(jar, lock[jar.name])


def kafka_home(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"kafka-{pins()['kafka']['version']}"


def fetch_kafka(cache: Path | None = None) -> Fetched:
    """The KRaft broker's jars from Maven Central, each checked against the lock list."""
    cache = cache or cache_dir()
    spec = pins()["kafka"]
    lock: dict[str, str] = spec["jars"]
    home = kafka_home(cache)
    lib = home / "lib"
    if _marker_ok(home, lock):
        present = {p.name for p in lib.glob("*.jar")}
        if present != set(lock):
            raise FetchError(f"Kafka cache {lib} holds other jars than pins.toml locks")
        for name, digest in lock.items():
            verify(lib / name, digest)
        return Fetched("kafka", home, False)
    if home.exists():
        shutil.rmtree(home)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=home.name + ".", dir=cache))
    try:
        if show_progress():
            print(
                f"resolving Kafka {spec['version']} jars with Maven...", file=sys.stderr, flush=True
            )
        jars = resolve_jars("Kafka", spec["dependencies"], tmp / "lib")
        check_locked(f"Kafka {spec['version']}", jars, lock, "kafka")
        _write_marker(tmp, lock)
        os.replace(tmp, home)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Fetched("kafka", home, True)


# --- Prism --------------------------------------------------------------------------------


def prism_binary(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"prism-{pins()['prism']['version']}" / "prism"


def _go() -> str:
    go = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None
    )
    if go is None:
        raise FetchError(
            "Prism is built from the Go module proxy: `go` is not on PATH (install Go >= 1.23)"
        )
    return go


# Prism's job service listens on every interface (``net.Listen("tcp", ":PORT")`` in
# internal/jobservices/server.go) and has no flag for the host; the stack's servers must listen on
# loopback only, so the pinned source is built with that one line changed.
_PRISM_LISTEN_FILE = "go/pkg/beam/runners/prism/internal/jobservices/server.go"
_PRISM_LISTEN_FROM = 'net.Listen("tcp", fmt.Sprintf(":%d", port))'
_PRISM_LISTEN_TO = 'net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))'
_PRISM_PATCH = "listen-loopback-v1"


def _last_line(result: subprocess.CompletedProcess) -> str:
    return ((result.stdout or "") + (result.stderr or "")).strip().splitlines()[-1:] or ["?"]


def _patched_prism_source(module_dir: Path, work: Path) -> Path:
    """A writable copy of the module's Go sources with the loopback-only listener."""
    src = work / "src"
    src.mkdir()
    for name in ("go.mod", "go.sum"):
        shutil.copy(module_dir / name, src / name)
    shutil.copytree(module_dir / "go", src / "go")
    for path in src.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)  # the module cache is read-only
    target = src / _PRISM_LISTEN_FILE
    text = target.read_text()
    if text.count(_PRISM_LISTEN_FROM) != 1:
        raise FetchError(f"Prism: cannot apply the loopback patch to {_PRISM_LISTEN_FILE}")
    target.write_text(text.replace(_PRISM_LISTEN_FROM, _PRISM_LISTEN_TO))
    return src


def fetch_prism(cache: Path | None = None) -> Fetched:
    """Beam's Prism runner, built from the pinned Go module with a loopback-only job service.

    Go itself checks the module against sum.golang.org; the module's ``h1:`` sum is also
    compared with the pin, so a changed proxy answer is refused even without the sumdb.
    """
    cache = cache or cache_dir()
    spec = pins()["prism"]
    binary = prism_binary(cache)
    expected = {
        "module": spec["module"],
        "version": spec["version"],
        "h1": spec["h1"],
        "patch": _PRISM_PATCH,
    }
    if binary.is_file() and _marker_ok(binary.parent, expected):
        return Fetched("prism", binary, False)
    go = _go()
    if show_progress():
        print(
            f"building Prism {spec['version']} from the Go module proxy (minutes when cold)...",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="qis-prism.") as work:
        env = {**os.environ, "GO111MODULE": "on", "GOFLAGS": "-buildvcs=false"}
        module = f"{spec['module']}@{spec['version']}"
        result = subprocess.run(
            [go, "mod", "download", "-json", module],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise FetchError(f"Prism: go mod download {module} failed: {_last_line(result)[0]}")
        info = json.loads(result.stdout)
        if info.get("Sum", "") != spec["h1"]:
            raise DigestMismatch(Path(module), spec["h1"], info.get("Sum", ""))
        src = _patched_prism_source(Path(info["Dir"]), Path(work))
        binary.parent.mkdir(parents=True, exist_ok=True)
        package = "./" + spec["package"].removeprefix(spec["module"] + "/")
        result = subprocess.run(
            [go, "build", "-trimpath", "-o", str(binary), package],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not binary.is_file():
            raise FetchError(f"Prism: go build {spec['package']} failed: {_last_line(result)[0]}")
    _write_marker(binary.parent, expected)
    return Fetched("prism", binary, True)


def require_tool(name: str, hint: str) -> str:
    """The path of command ``name``, or a one-line :class:`FetchError` saying what to install."""
    path = shutil.which(name)
    if path is None:
        raise FetchError(f"`{name}` is not on PATH: {hint}")
    return path


# --- the pieces not served ------------------------------------------------------------------


def unavailable() -> dict[str, dict]:
    """Artifacts the stack would use but cannot download here (``[unavailable.*]``)."""
    return dict(pins().get("unavailable", {}))


def fetch_flink_job_server(cache: Path | None = None) -> Fetched:
    from qis_beam.stack.jobserver import fetch_job_server  # it imports this module

    return fetch_job_server(cache)


FETCHERS = {
    "flink": fetch_flink,
    "flink_job_server": fetch_flink_job_server,
    "kafka": fetch_kafka,
    "prism": fetch_prism,
}


def fetch(only: list[str] | None = None, cache: Path | None = None) -> list[Fetched]:
    """Fetch the named pieces (default: all downloadable ones) in a fixed order."""
    names = [n for n in FETCHERS if only is None or n in only]
    return [FETCHERS[name](cache) for name in names]


def cached_size(path: Path) -> int:
    """Bytes under ``path`` (a file or a directory), for the fetch report."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = [
    "DigestMismatch",
    "FetchError",
    "Fetched",
    "fetch",
    "fetch_flink",
    "fetch_kafka",
    "fetch_prism",
    "flink_home",
    "kafka_home",
    "prism_binary",
    "sha256_of",
    "unavailable",
]
