"""PostgreSQL from Debian's ``postgresql`` package: a private cluster on a loopback port.

PostgreSQL refuses to run as root. As root the cluster runs as the Debian ``postgres`` user
(``setpriv``, which execs, so the recorded PID is the postmaster's); its data directory and
unix socket then live under ``/var/tmp/qis-beam-postgres-<id>`` because the ``postgres`` user
cannot enter root's private folders (``~``, pytest's tmp). As any other user they live in
the state folder. Authentication is ``trust`` on loopback only: a local development stack.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from qis_beam.stack.fetch import FetchError, require_tool
from qis_beam.stack.procs import spawn
from qis_beam.stack.state import Piece

NAME = "postgres"
PORTS = ("port",)
DATABASE = "qis"
USER = "qis"
SERVICE_USER = "postgres"  # Debian's system user, used when we run as root


class PostgresMissing(FetchError):
    """The Debian package is not installed (one line, like any fetch failure)."""


def bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb, postgres and pg_isready."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    if not found:
        raise PostgresMissing("PostgreSQL is not installed: apt-get install postgresql")
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _as_service_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    require_tool("setpriv", "running PostgreSQL as root needs util-linux's setpriv")
    return [
        "setpriv",
        f"--reuid={SERVICE_USER}",
        f"--regid={SERVICE_USER}",
        "--init-groups",
        "--",
        *command,
    ]


def _data_root(state: Path) -> Path:
    if os.geteuid() != 0:
        return state
    tag = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"qis-beam-postgres-{tag}"


def launch(state_dir: Path, ports: dict[str, int]) -> Piece:
    binaries = bin_dir()
    state = Path(state_dir) / NAME
    state.mkdir(parents=True, exist_ok=True)
    root = _data_root(state)
    data = root / "data"
    log = state / "postgres.log"
    root.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        account = pwd.getpwnam(SERVICE_USER)
        os.chown(root, account.pw_uid, account.pw_gid)
        link = state / "data"
        if not link.exists():
            link.symlink_to(root, target_is_directory=True)
    if not (data / "PG_VERSION").exists():
        with open(log, "ab") as out:
            subprocess.run(
                _as_service_user(
                    [
                        str(binaries / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--no-instructions",
                    ]
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
                check=False,
            )
    proc = spawn(
        "postmaster",
        _as_service_user(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={ports['port']}",
                "-c",
                f"unix_socket_directories={root}",
                "-c",
                "logging_collector=off",
            ]
        ),
        log,
        cwd=root,
    )
    port = ports["port"]
    return Piece(
        name=NAME,
        procs=[proc],
        endpoints={
            "url": f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}",
            "admin_url": f"postgresql://postgres@127.0.0.1:{port}/postgres",
        },
        log=str(log),
        data={"bin": str(binaries), "data_root": str(root), "port": str(port)},
    )


def _psql(piece: Piece, sql: str) -> subprocess.CompletedProcess:
    psql = Path(piece.data["bin"]) / "psql"
    return subprocess.run(
        [str(psql), piece.endpoints["admin_url"], "-v", "ON_ERROR_STOP=1", "-tAc", sql],
        capture_output=True,
        text=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
    )


def healthy(piece: Piece) -> bool:
    """Accepts a connection; then makes sure the ``qis`` role and database exist."""
    ready = subprocess.run(
        [
            str(Path(piece.data["bin"]) / "pg_isready"),
            "-h",
            "127.0.0.1",
            "-p",
            piece.data["port"],
            "-U",
            "postgres",
            "-d",
            "postgres",
        ],
        capture_output=True,
        timeout=5,
    )
    if ready.returncode != 0:
        return False
    if _psql(piece, f"SELECT 1 FROM pg_roles WHERE rolname = '{USER}'").stdout.strip() != "1":
        _psql(piece, f"CREATE ROLE {USER} LOGIN CREATEDB")
    if (
        _psql(piece, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'").stdout.strip()
        != "1"
    ):
        _psql(piece, f"CREATE DATABASE {DATABASE} OWNER {USER}")
    check = subprocess.run(
        [str(Path(piece.data["bin"]) / "psql"), piece.endpoints["url"], "-tAc", "SELECT 1"],
        capture_output=True,
        text=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
    )
    return check.stdout.strip() == "1"


def purge(state_dir: Path) -> None:
    """Delete the cluster's data of ``state_dir`` (ephemeral stacks such as pytest's)."""
    root = _data_root(Path(state_dir).resolve() / NAME)
    shutil.rmtree(root, ignore_errors=True)
