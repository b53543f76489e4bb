"""Flink session cluster: one JobManager and TaskManagers with 2 slots each, via Flink's scripts,
and the Python SDK worker pool beside them (:mod:`qis_beam.stack.worker_pool`).

The scripts (``bin/jobmanager.sh`` / ``bin/taskmanager.sh start-foreground``) compute the
memory settings and add the Java 17 ``--add-opens`` flags from ``conf/config.yaml``; they
``exec`` the JVM, so the recorded PID is the JVM's. Configuration lives in a per-state-dir
copy of ``conf/`` (the cached distribution is never written to).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from qis_beam.flink_rest import taskmanagers
from qis_beam.stack.fetch import fetch_flink, require_tool
from qis_beam.stack.ports import port_open
from qis_beam.stack.procs import spawn
from qis_beam.stack.state import Piece, Proc

NAME = "flink"
SLOTS_PER_TASKMANAGER = 2


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


#: JVM flags of the local stack's JobManager and TaskManager (see :func:`flink_config`).
LOCAL_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def flink_config(state: Path, rest_port: int, rpc_port: int, shipped: dict) -> dict[str, object]:
    """The distribution's config.yaml (it holds the Java 17 flags) with loopback overrides."""
    config = _flatten(shipped)
    config.update(
        {
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": rpc_port,
            "jobmanager.bind-host": "127.0.0.1",
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": rest_port,
            "taskmanager.numberOfTaskSlots": SLOTS_PER_TASKMANAGER,
            "parallelism.default": 1,
            # Modest memory: the machine is shared with Kafka, the emulator and tests.
            "jobmanager.memory.process.size": "1024m",
            # 3 GB: with 2.5 GB (a 461-MiB heap) a 12M-record backfill at parallelism 2, in a
            # slow-disk phase, ran the heap out in a gRPC thread parsing SDK worker output. The
            # heap holds a subtask's whole stage output (runners/sizing.py sizes batch jobs).
            "taskmanager.memory.process.size": "3072m",
            # That OutOfMemoryError was uncaught: the job neither failed nor went on. Now an
            # uncaught error exits its JVM (TaskManager or JobManager): the job fails instead.
            "cluster.uncaught-exception-handling": "FAIL",
            # gRPC to the SDK workers allocates direct (off-heap) buffers; with only the
            # framework's 128 MB a 4M-packet backfill failed with "OutOfMemoryError: Direct
            # buffer memory" (and its retry then hung on the broken data channel).
            "taskmanager.memory.task.off-heap.size": "384m",
            # Batch: Flink's sort shuffle reserves min-buffers per result partition and a
            # batch job deploys several tasks at once; the default 512 of ~100 MB of network
            # memory failed backfills ("Insufficient number of network buffers").
            "taskmanager.memory.network.min": "256m",
            "taskmanager.memory.network.max": "256m",
            "taskmanager.network.sort-shuffle.min-buffers": 128,
            # Batch shuffle data never leaves this machine, so LZ4 only costs CPU that the SDK
            # workers need: without it a 4M backfill's TaskManager used 9.6-10.5 CPU-s at
            # parallelism 2, not 12.1-13.1. A cluster whose shuffles cross a network keeps it.
            "taskmanager.network.batch-shuffle.compression.enabled": False,
            # Streaming: per-packet keys (dedupe, too-late marks) live until their TTL; on the
            # heap they exhausted the TaskManager after ~77k packets. RocksDB keeps them on disk.
            "state.backend.type": "rocksdb",
            # Incremental: a full RocksDB snapshot copies all state at every checkpoint (220 MB
            # every 10 s after 370k packets, which slowed the job as its state grew).
            "state.backend.incremental": True,
            # Checkpoints and savepoints on local disk, kept on cancel, for restores by hand.
            "state.checkpoints.dir": (state / "checkpoints").as_uri(),
            "state.savepoints.dir": (state / "savepoints").as_uri(),
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
            "restart-strategy.type": "fixed-delay",
            # A killed TaskManager costs several restarts before its heartbeat times out, and
            # its replacement may take a minute on a busy machine: allow 5 minutes of retries.
            "restart-strategy.fixed-delay.attempts": 150,
            "restart-strategy.fixed-delay.delay": "2 s",
            # A killed TaskManager is noticed in seconds, not after the default 50 s.
            "heartbeat.interval": 2000,
            "heartbeat.timeout": 10000,
            # Short jobs on 2 cores: C2's compiles and G1's concurrent threads took CPU from the
            # SDK workers (a TaskManager spent 7-9 CPU-s on a 2k-packet backfill). With C1 only
            # and the serial collector, a 4M backfill at parallelism 2 ran 25-27 s, not 29-31;
            # a 50k Kafka stream kept its speed. A long-lived production cluster keeps C2.
            "env.java.opts.jobmanager": LOCAL_JVM_OPTIONS,
            "env.java.opts.taskmanager": LOCAL_JVM_OPTIONS,
            "io.tmp.dirs": str(state / "tmp"),
            # A finished job's blobs (the 157 MB job server jar) leave a running TaskManager
            # after a minute, not the default hour: a benchmark runs tens of jobs.
            "blob.service.cleanup.interval": 60,
            "web.tmpdir": str(state / "web-tmp"),
            "web.upload.dir": str(state / "web-upload"),
        }
    )
    return config


#: Scratch directories: emptied at every start. Checkpoints and savepoints are kept.
SCRATCH = ("tmp", "web-tmp", "web-upload")


def fresh_scratch(state: Path) -> None:
    """Empty the scratch directories and make sure every directory the cluster uses exists.

    The TaskManager's working directory (under ``tmp``, named by its fixed resource id) keeps
    each job's blobs: the job server's 157 MB jar, once per job. A TaskManager killed before
    its blob cleanup left them there, and a new one SHA-1-checks every blob it finds before
    it registers: with 12 GB from ~80 jobs the stack took 160-180 s to come up, not ~28.
    """
    for sub in SCRATCH:
        shutil.rmtree(state / sub, ignore_errors=True)
    for sub in ("log", *SCRATCH, "checkpoints", "savepoints"):
        (state / sub).mkdir(parents=True, exist_ok=True)


def _env(state: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLINK_CONF_DIR": str(state / "conf"),
        "FLINK_LOG_DIR": str(state / "log"),
        "FLINK_PID_DIR": str(state),
    }


def launch(state_dir: Path, ports: dict[str, int]) -> Piece:
    require_tool("java", "Flink needs Java 17 (apt-get install openjdk-17-jre-headless)")
    home = fetch_flink().path
    state = Path(state_dir) / NAME
    conf = state / "conf"
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(home / "conf", conf)
    shipped = yaml.safe_load((home / "conf" / "config.yaml").read_text()) or {}
    config = flink_config(state, ports["rest"], ports["rpc"], shipped)
    (conf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    fresh_scratch(state)
    jobmanager = spawn(
        "jobmanager",
        [str(home / "bin" / "jobmanager.sh"), "start-foreground"],
        state / "jobmanager.log",
        env=_env(state),
        cwd=state,
    )
    piece = Piece(
        name=NAME,
        procs=[jobmanager],
        endpoints={
            "rest": f"http://127.0.0.1:{ports['rest']}",
            "flink_master": f"127.0.0.1:{ports['rest']}",
        },
        log=jobmanager.log,
        data={"home": str(home), "state": str(state), "taskmanagers": "1"},
    )
    piece.procs.append(
        spawn(
            "sdk-worker-pool",
            [sys.executable, "-m", "qis_beam.stack.worker_pool", "--port", str(ports["pool"])],
            state / "sdk-worker-pool.log",
            cwd=state,
        )
    )
    piece.endpoints["sdk_worker_pool"] = f"127.0.0.1:{ports['pool']}"
    piece.procs.append(start_taskmanager(piece, 1))
    return piece


def start_taskmanager(piece: Piece, number: int) -> Proc:
    """One more TaskManager for the cluster of ``piece`` (e.g. after killing one)."""
    state = Path(piece.data["state"])
    home = Path(piece.data["home"])
    return spawn(
        f"taskmanager-{number}",
        [
            str(home / "bin" / "taskmanager.sh"),
            "start-foreground",
            f"-Dtaskmanager.resource-id=qis-tm-{number}",
        ],
        state / f"taskmanager-{number}.log",
        env=_env(state),
        cwd=state,
    )


def registered_taskmanagers(rest_url: str) -> dict[str, int]:
    """Resource id -> slots of every TaskManager the JobManager lists (dead ones included
    until their heartbeat times out)."""
    return {tm["id"]: tm.get("slotsNumber", 0) for tm in taskmanagers(rest_url)}


def healthy(piece: Piece) -> bool:
    """The SDK worker pool listens, REST answers and every TaskManager of the piece
    registered, by its resource id, with its 2 slots. (Counting is not enough: right after a
    ``kill -9`` the JobManager still lists the dead TaskManager, so the count matches before
    the replacement registers.)"""
    taskmanagers = [p for p in piece.procs if p.role.startswith("taskmanager")]
    expected = {f"qis-tm-{p.role.rsplit('-', 1)[1]}" for p in taskmanagers}
    registered = registered_taskmanagers(piece.endpoints["rest"])
    pool = piece.endpoints.get("sdk_worker_pool")
    pool_up = pool is None or port_open(int(pool.rsplit(":", 1)[1]))
    return pool_up and all(registered.get(tm) == SLOTS_PER_TASKMANAGER for tm in expected)


PORTS = ("rest", "rpc", "pool")
