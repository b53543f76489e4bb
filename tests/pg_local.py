"""A private PostgreSQL server for tests that must stop and restart one (store down ->
UNAVAILABLE -> recovery), and the fallback ``postgres_url`` while the stack fixtures are
missing. initdb in a temporary folder, run as the ``postgres`` user (PostgreSQL refuses
root), on a free loopback port; stopped by its PID.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="qis-pg-")
        self.data = os.path.join(self.dir, "data")
        self.process: subprocess.Popen | None = None
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run([_bin("initdb"), "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8"])

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _demote(self):
        if self._user:
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)

    def _run(self, argv):
        subprocess.run(argv, check=True, capture_output=True, preexec_fn=self._demote)

    def start(self) -> LocalPostgres:
        self.process = subprocess.Popen(
            [
                _bin("postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                self.dir,
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.dir, "log"), "ab"),  # noqa: SIM115
            preexec_fn=self._demote,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                import psycopg

                psycopg.connect(self.url, connect_timeout=2).close()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None:
                    raise RuntimeError(f"postgres exited: see {self.dir}/log") from None
                time.sleep(0.1)
        raise RuntimeError("postgres did not start in 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: closes client connections
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server at ``server_url``; returns its URL."""
    import secrets

    import psycopg

    name = "qis_" + secrets.token_hex(6)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"
