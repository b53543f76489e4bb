"""The Pub/Sub emulator from Debian's ``google-cloud-cli-pubsub-emulator`` package."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

from qis_beam.stack.fetch import FetchError
from qis_beam.stack.procs import spawn
from qis_beam.stack.state import Piece

NAME = "pubsub"
PORTS = ("port",)
PACKAGE = "google-cloud-cli-pubsub-emulator"
#: A project name for the health probe; the emulator accepts any project.
PROBE_PROJECT = "qis-local"


class EmulatorMissing(FetchError):
    """The Debian package is not installed (one line, like any fetch failure)."""


def emulator_launcher() -> Path:
    """The ``cloud-pubsub-emulator`` start script the Debian package installs."""
    candidates = glob.glob(
        "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
    )
    if not candidates and shutil.which("dpkg"):
        listing = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True).stdout
        candidates = [
            line for line in listing.splitlines() if line.endswith("/bin/cloud-pubsub-emulator")
        ]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise EmulatorMissing(
        f"the Pub/Sub emulator is not installed: apt-get install {PACKAGE} "
        "(Google Cloud's apt repository)"
    )


def launch(state_dir: Path, ports: dict[str, int]) -> Piece:
    launcher = emulator_launcher()
    state = Path(state_dir) / NAME
    (state / "data").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAVA_OPTS": "-Xmx512m"}
    # The emulator keeps its (in-memory) data and any files in its working directory.
    proc = spawn(
        "emulator",
        [str(launcher), "--host=127.0.0.1", f"--port={ports['port']}"],
        state / "emulator.log",
        env=env,
        cwd=state / "data",
    )
    host = f"127.0.0.1:{ports['port']}"
    return Piece(
        name=NAME,
        procs=[proc],
        endpoints={"host": host, "PUBSUB_EMULATOR_HOST": host, "rest": f"http://{host}"},
        log=proc.log,
        data={"state": str(state)},
    )


def healthy(piece: Piece) -> bool:
    url = f"{piece.endpoints['rest']}/v1/projects/{PROBE_PROJECT}/topics"
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200
