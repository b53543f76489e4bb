"""Beam on Flink on the local stack: backfill speed at parallelism 1 and 2, and the Kafka
stream's speed and largest state value per key (issue 9). A measurement, never a test.

    python benchmarks/bench_flink.py backfill                  # 1M unsigned packets, p1 and p2
    python benchmarks/bench_flink.py backfill --packets 200000 --parallelism 1,2 --runs 2
    python benchmarks/bench_flink.py stream                    # 50k, 200k, 800k packets via Kafka
    python benchmarks/bench_flink.py stream --sizes 50000 --parallelism 1,2

Both start what they need with ``qis_beam.stack`` in a fresh temporary state folder (Flink;
Kafka for ``stream``) and stop it at the end, with every process this script started (the
SDK worker pool, the ``qis-beam`` launchers and the job servers they start), by PID, also on
an error or Ctrl-C.

Where Python runs (``--environment``): ``external`` (the default of ``backfill``) is an SDK
worker pool beside the TaskManager, the stack's own (:mod:`qis_beam.stack.worker_pool`, as the
``local-flink`` profile uses for batch: ``--environment_type=EXTERNAL``,
``--sdk_worker_parallelism=2``), so parallelism 2 gets two SDK worker *processes* and can use
both cores; ``loopback`` (the ``local-flink`` profile's streaming default, and the default of
``stream``, where it was 1.4x faster) runs every bundle in the submitting process, one GIL,
whatever the parallelism.

backfill: ``qis-beam backfill --profile local-flink`` over ``--packets`` unsigned packets
(1000 zipf-skewed addresses, the log of benchmarks/bench_backfill.py, reused from its work
folder), and the same files on the FnApiRunner for reference. Per run: wall time of the
launcher; *submit* (launch until the Flink job exists: job-server JVM, pipeline build,
staging); the Flink job's own duration (REST); *after* (job end until the launcher exits:
store load, summary, publish). A ``--baseline-packets`` run of the same kind gives the job's
fixed cost, so the *marginal* rate ``(N - n0) / (job - job0)`` is the engine's speed with
start-up taken out. CPU seconds of the SDK workers, the TaskManager and the launcher tree,
how busy the machine was (both cores, all processes) and a fixed Python loop's time (the
machine's speed at that moment) are printed next to each figure. ``--runs`` are rounds of one
run per parallelism, so p1 and p2 run side by side in time (this machine's speed drifts by a
quarter within minutes); each round's p1/p2 job-time ratio and their median are printed.
Each round also starts with the references for that ratio: how much faster two processes side
by side get through a pure-Python loop than one alone (:func:`pair_probe`), and through the
pipeline's own validation and fold kernels over the first records of the input
(:func:`workload_pair_probe`), on this machine, then. The ratio is printed as a share of each.

stream: per size, a swarm with recent event times (same 2 h span, 1000 nodes, 1000 zipf
addresses) is published to its own Kafka topic, then ``qis-beam run --source kafka`` on
Flink reads it, unbounded. records/s = ``records_in`` / the job's *active*
time: from its first record out of the reader to the last change of any vertex's record
counts (Flink REST, sampled every second). Once nothing moved for ``--drain-quiet`` seconds the
job's Beam metrics are read from Flink's REST API (the Beam Flink runner registers every Beam
counter and distribution as a Flink operator metric) and the job is cancelled (``--end``):
the largest state value per key is the max of the ``qis/state_bytes.*`` distributions over
all subtasks. ``--end drain`` stops it with a drained savepoint instead, so the job FINISHES
and the PipelineResult's metrics (the launcher runs in a wrapper that keeps them) are read
too, but the drain fires every per-packet timer (minutes). ``--end savepoint`` never completed
here while the reader had a backlog (checkpoints stall). ``--shutdown-idle-ms N`` ends the job
with ``--shutdown_sources_after_idle_ms=N`` instead, which loses data: the idle clock is the
Impulse source's, so after N ms the final watermark passes while the reader still defers its
remainder (a 20k run read 5,000 records).

Checkpoints: every ``--checkpoint-ms`` (default 60 s, the ``flink`` profile's interval; the
``local-flink`` profile's 10 s serves its recovery test, and once a stream's RocksDB state
reached 250 MB its checkpoints took minutes and slowed the stream to a crawl).

Flink configuration: the stack's (:func:`qis_beam.stack.flink.flink_config`: RocksDB state,
256 MB of network memory); ``--flink-conf KEY=VALUE`` (repeatable) adds to it for this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

HOUR_MS = 3_600_000
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FLINK_CONF: tuple[str, ...] = ()

# --- machine figures ---------------------------------------------------------------------


def load1() -> float:
    return os.getloadavg()[0]


def _cpu_times() -> tuple[int, int, int, int]:
    """(busy, total, iowait, steal) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total, fields[4], fields[7]


def _stalls() -> dict[str, float]:
    """Seconds some task of the machine stalled on CPU, I/O and memory (Linux PSI; empty
    where the kernel has none): what tells a slow round on a shared VM from a slow job."""
    out: dict[str, float] = {}
    for resource in ("cpu", "io", "memory"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/pressure/{resource}") as f:
                some = f.readline().split()  # some avg10=.. avg60=.. avg300=.. total=<us>
            out[resource] = int(some[4].partition("=")[2]) / 1e6
    return out


def proc_cpu_s(pid: int | None) -> float:
    """CPU seconds of ``pid`` and its reaped children (0 when gone)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root: int | None) -> float:
    """CPU seconds of ``root`` and every live descendant (with their reaped children)."""
    if not root:
        return 0.0
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += proc_cpu_s(pid)
        todo.extend(children.get(pid, []))
    return total


class Meter:
    """Load and machine CPU use over one measured run."""

    def __init__(self):
        self.load_before = load1()
        self.busy0, self.total0, self.iowait0, self.steal0 = _cpu_times()
        self.stalls0 = _stalls()

    def stop(self) -> dict:
        busy, total, iowait, steal = _cpu_times()
        span = max(1, total - self.total0)
        stalls = _stalls()
        return {
            "load1_before": round(self.load_before, 2),
            "load1_after": round(load1(), 2),
            # share of both cores busy (all processes on the machine) during the run
            "machine_busy": round((busy - self.busy0) / span, 3),
            "machine_iowait": round((iowait - self.iowait0) / span, 3),
            "machine_steal": round((steal - self.steal0) / span, 3),
            **{
                f"{k}_stall_s": round(v - self.stalls0[k], 1)
                for k, v in stalls.items()
                if k in self.stalls0
            },
        }


# --- Flink REST ---------------------------------------------------------------------------


class FlinkRest:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.load(response)

    def jobs(self) -> dict[str, dict]:
        return {j["jid"]: j for j in self.get("/jobs/overview")["jobs"]}

    def cancel_running(self, known: set[str]) -> None:
        for jid, job in self.jobs().items():
            if jid not in known and job["state"] not in ("FINISHED", "CANCELED", "FAILED"):
                request = urllib.request.Request(
                    f"{self.url}/jobs/{jid}?mode=cancel", method="PATCH"
                )
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(request, timeout=10).close()

    def stop(self, jid: str, drain: bool) -> None:
        """Stop with a savepoint: the job FINISHES, so the job server hands its metrics to the
        PipelineResult (a cancelled job has none). ``drain`` also moves the watermark to the end
        of time first, so every event-time timer fires (slow here: one per packet key)."""
        request = urllib.request.Request(
            f"{self.url}/jobs/{jid}/stop",
            data=json.dumps({"drain": drain}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()

    def beam_metrics(self, jid: str) -> dict:
        """The job's Beam metrics as Flink reports them while it runs (the Beam Flink runner
        registers every Beam counter and distribution as a Flink metric of its operator):
        counters summed over subtasks and steps, distributions merged."""
        import urllib.parse

        out: dict = {"counters": {}, "distributions": {}, "error": None, "source": "flink-rest"}
        for v in self.get(f"/jobs/{jid}")["vertices"]:
            ids = [m["id"] for m in self.get(f"/jobs/{jid}/vertices/{v['id']}/metrics")]
            ids = [i for i in ids if ".qis_" in i]
            if not ids:
                continue
            query = urllib.parse.quote(",".join(ids), safe=",")
            for m in self.get(f"/jobs/{jid}/vertices/{v['id']}/metrics?get={query}"):
                name = m["id"].rsplit(".", 1)[1]  # qis_state_bytes_dedupe, qis_records_in, ...
                value = m["value"]
                found = re.match(
                    r"DistributionResult\{sum=(-?\d+), count=(\d+), min=(-?\d+), max=(-?\d+)\}",
                    value,
                )
                if found:
                    total, count, low, high = (int(x) for x in found.groups())
                    prev = out["distributions"].get(name)
                    if prev:
                        total, count = total + prev["sum"], count + prev["count"]
                        low, high = min(low, prev["min"]), max(high, prev["max"])
                    out["distributions"][name] = {
                        "count": count,
                        "sum": total,
                        "min": low,
                        "max": high,
                    }
                else:
                    with contextlib.suppress(ValueError):
                        out["counters"][name] = out["counters"].get(name, 0) + int(float(value))
        return out

    def record_counts(self, jid: str) -> int:
        """Records read plus written over every vertex of the job (its data-flow activity)."""
        job = self.get(f"/jobs/{jid}")
        return sum(
            v["metrics"].get("read-records", 0) + v["metrics"].get("write-records", 0)
            for v in job["vertices"]
        )


# --- processes ----------------------------------------------------------------------------


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a process started in its own session and everything left in its group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; members of its group (a job server JVM) may not be
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        return


def flink_handles(piece, environment: str) -> tuple[FlinkRest, dict, str | None]:
    """The cluster's REST API, the PIDs whose CPU is measured (TaskManager; SDK worker pool for
    ``--environment external``) and the pool's endpoint (None: LOOPBACK)."""
    pids = {"taskmanager": next(p.pid for p in piece.procs if p.role.startswith("taskmanager"))}
    pool = None
    if environment == "external":
        pids["sdk_workers"] = next(p.pid for p in piece.procs if p.role == "sdk-worker-pool")
        pool = piece.endpoints["sdk_worker_pool"]
    return FlinkRest(piece.endpoints["rest"]), pids, pool


@contextlib.contextmanager
def flink_config_overrides(items: list[str]):
    """Add KEY=VALUE settings to the stack's Flink configuration while the stack starts."""
    from qis_beam.stack import flink

    extra: dict[str, object] = {}
    for item in items:
        if item == "none":
            continue
        key, _, value = item.partition("=")
        extra[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    original = flink.flink_config

    def patched(*args, **kwargs):
        config = original(*args, **kwargs)
        config.update(extra)
        return config

    flink.flink_config = patched
    try:
        yield extra
    finally:
        flink.flink_config = original


@contextlib.contextmanager
def local_stack(work: Path, pieces: list[str], flink_conf: list[str]):
    """The pieces in a fresh state folder under ``work``; stopped (and purged) at the end."""
    from qis_beam import stack

    state = work / "stack"
    try:
        with flink_config_overrides(flink_conf) as extra:
            started = stack.up(state, only=pieces, tie_to_caller=True)
        for name, item in started.items():
            print(f"  {name} healthy after {item.seconds:.1f}s", flush=True)
        if extra:
            print(f"  Flink configuration added: {extra}", flush=True)
        yield started
    finally:
        stack.down(state, purge=True)


def job_server_jar(explicit: str | None) -> str:
    """--job-server-jar, else $QIS_FLINK_JOB_SERVER_JAR, else the local-flink profile's, else
    the jar ``qis-beam stack fetch`` built into the cache."""
    if explicit:
        return explicit
    if os.environ.get("QIS_FLINK_JOB_SERVER_JAR"):
        return os.environ["QIS_FLINK_JOB_SERVER_JAR"]
    with contextlib.suppress(Exception):
        from qis_beam.runners.profiles import profile_options

        jar = profile_options("local-flink", False).get("flink_job_server_jar")
        if jar:
            return str(jar)
    with contextlib.suppress(Exception):
        from qis_beam.stack.jobserver import cached_jar

        jar = cached_jar()
        if jar:
            return str(jar)
    raise SystemExit(
        "no Flink job-server jar: pass --job-server-jar, set QIS_FLINK_JOB_SERVER_JAR or run "
        "`qis-beam stack fetch`"
    )


EXTRA_BEAM_ARGS: list[str] = []  # --beam-arg
END = ["cancel"]  # --end: how a quiet stream job ends (cancel, savepoint, drain)


def flink_args(master: str, jar: str, parallelism: int, pool: str | None) -> list[str]:
    args = [
        "--profile",
        "local-flink",
        f"--flink_master={master}",
        f"--flink_job_server_jar={jar}",
        f"--parallelism={parallelism}",
    ]
    if pool is not None:
        args += [
            "--environment_type=EXTERNAL",
            f"--environment_config={pool}",
            f"--sdk_worker_parallelism={parallelism}",
        ]
    return args + EXTRA_BEAM_ARGS


# --- the launcher, in a wrapper that keeps the PipelineResult's metrics -------------------


def cli_with_metrics(metrics_path: str, argv: list[str]) -> int:
    """``qis-beam ARGV``; then the metrics of the last pipeline it ran, as JSON."""
    import apache_beam as beam

    from qis_beam.cli import main

    results = []
    original = beam.Pipeline.run

    def run(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        results.append(result)
        return result

    beam.Pipeline.run = run
    code = main(argv)
    out: dict = {"counters": {}, "distributions": {}, "error": None}
    if results:
        try:
            query = results[-1].metrics().query()
            for m in query["counters"]:
                name = f"{m.key.metric.namespace}/{m.key.metric.name}"
                out["counters"][name] = out["counters"].get(name, 0) + (m.committed or 0)
            for m in query["distributions"]:
                d = m.committed
                if d is None or not d.count:
                    continue
                name = f"{m.key.metric.namespace}/{m.key.metric.name}"
                prev = out["distributions"].get(name)
                cur = {"count": d.count, "sum": d.sum, "min": d.min, "max": d.max}
                if prev:  # the same metric reported by several steps: merge
                    cur = {
                        "count": prev["count"] + d.count,
                        "sum": prev["sum"] + d.sum,
                        "min": min(prev["min"], d.min),
                        "max": max(prev["max"], d.max),
                    }
                out["distributions"][name] = cur
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            out["error"] = f"{type(error).__name__}: {error}"
    Path(metrics_path).write_text(json.dumps(out, indent=1))
    return code


def vertex_timings(rest: FlinkRest, jid: str, v: dict, job_start: float) -> dict:
    """A finished vertex: when it started (s into the job), how long it and each subtask ran,
    and its record counts (a subtask that ran longest shows an imbalance)."""
    subtasks = rest.get(f"/jobs/{jid}/vertices/{v['id']}")["subtasks"]
    return {
        "name": v["name"][:160],
        "parallelism": v["parallelism"],
        "duration_s": v["duration"] / 1000,
        "start_s": v["start-time"] / 1000 - job_start,
        **{
            k: v["metrics"].get(k)
            for k in (
                "read-records",
                "write-records",
                "read-bytes",
                "write-bytes",
                "accumulated-busy-time",
                "accumulated-backpressured-time",
                "accumulated-idle-time",
            )
        },
        "subtasks": [
            {
                "duration_s": s["duration"] / 1000,
                "read_records": s["metrics"].get("read-records"),
                "write_records": s["metrics"].get("write-records"),
            }
            for s in subtasks
        ],
    }


def launch(
    argv: list[str],
    work: Path,
    name: str,
    timeout: float,
    rest: FlinkRest | None = None,
    pids: dict[str, int | None] | None = None,
    drain_quiet_s: float | None = None,
    sample_every_s: float = 0.0,
) -> dict:
    """Run ``qis-beam ARGV`` in its own session; wall time, CPU, metrics and (with ``rest``)
    the Flink job's timings. Everything it started is stopped when it returns.

    ``drain_quiet_s``: once records have flowed and no vertex's counts changed for that long,
    the Beam metrics are read from Flink's REST API and the job is ended as ``--end`` says:
    cancelled (the default), or stopped with a savepoint, with or without drain (see
    :meth:`FlinkRest.stop`; then the PipelineResult's metrics are read too).

    ``sample_every_s``: also read the running job's Beam metrics that often and append
    records_in, valid and the largest state values so far to ``NAME.samples.jsonl``."""
    metrics_path = work / f"{name}.metrics.json"
    log_path = work / f"{name}.log"
    samples_path = work / f"{name}.samples.jsonl"
    known = set(rest.jobs()) if rest else set()
    cpu0 = {k: tree_cpu_s(v) for k, v in (pids or {}).items()}
    meter = Meter()
    launched = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_cli", str(metrics_path), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    jid, samples, drained, live = None, [], None, None  # samples: (time, record count)
    sampled_at = time.time()
    try:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no end after {timeout:.0f}s, see {log_path}")
            if rest is not None:
                with contextlib.suppress(OSError, KeyError, ValueError):
                    if jid is None:
                        new = [j for j in rest.jobs() if j not in known]
                        jid = new[0] if new else None
                    if jid is not None:
                        samples.append((time.time(), rest.record_counts(jid)))
                    if jid is not None and sample_every_s and drained is None:
                        if time.time() - sampled_at >= sample_every_s:
                            sampled_at = time.time()
                            sample_metrics(rest, jid, samples_path)
                    quiet = quiet_since(samples)
                    if drain_quiet_s and drained is None and quiet is not None:
                        if time.time() - quiet >= drain_quiet_s:
                            drained = time.time()
                            live = rest.beam_metrics(jid)
                            if END[0] == "cancel":
                                rest.cancel_running(known)
                            else:
                                rest.stop(jid, drain=END[0] == "drain")
                            print(
                                f"    [{name}] quiet for {drain_quiet_s:.0f}s: metrics read, "
                                f"job ended by {END[0]}",
                                flush=True,
                            )
            time.sleep(1.0 if rest is not None else 0.2)
        ended = time.time()
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        stop_group(process)
        if rest is not None:
            with contextlib.suppress(OSError):
                rest.cancel_running(known)
    result = {
        "name": name,
        "returncode": process.returncode,
        "wall_s": ended - launched,
        "launcher_cpu_s": usage.ru_utime + usage.ru_stime,
        **meter.stop(),
        **{f"{k}_cpu_s": tree_cpu_s(v) - cpu0[k] for k, v in (pids or {}).items()},
        "log": str(log_path),
    }
    with contextlib.suppress(OSError, ValueError):
        result["metrics"] = json.loads(metrics_path.read_text())
    if samples_path.exists():
        result["samples"] = [json.loads(line) for line in samples_path.read_text().splitlines()]
    if live is not None:
        result["live_metrics"] = live
        if not (result.get("metrics") or {}).get("distributions"):
            result["metrics"] = live  # the cancelled job's PipelineResult has none
    if rest is not None and jid is not None:
        job = rest.jobs()[jid]
        result["flink_state"] = job["state"]
        start, end = job["start-time"] / 1000, job["end-time"] / 1000
        result["submit_s"] = start - launched
        result["job_s"] = job["duration"] / 1000
        result["after_s"] = ended - end if end > 0 else None
        with contextlib.suppress(OSError, KeyError, ValueError):
            result["vertices"] = [
                vertex_timings(rest, jid, v, start) for v in rest.get(f"/jobs/{jid}")["vertices"]
            ]
        result["active_s"] = active_time([x for x in samples if drained is None or x[0] < drained])
        if drained is not None:
            result["drain_s"] = end - drained if end > 0 else None
    if process.returncode and not (drained and END[0] == "cancel"):
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name} failed ({process.returncode}), {log_path}:\n{tail}")
    return result


def sample_metrics(rest: FlinkRest, jid: str, path: Path) -> None:
    """One line of a running stream's progress: records in, valid, largest state values."""
    metrics = rest.beam_metrics(jid)
    row = {
        "t": round(time.time(), 1),
        "records_in": counter(metrics, "records_in"),
        "valid": counter(metrics, "valid"),
        "sizes": {k: d.get("max") for k, d in state_sizes(metrics).items()},
    }
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")


# Record counts of a job that has started reading: the Impulse and the partition listing
# account for a handful, and a reader can take a while to get its first batch.
FLOWING_COUNT = 1000


def quiet_since(samples: list[tuple[float, int]]) -> float | None:
    """When the counts last changed, once records have flowed (None before)."""
    if not samples or samples[-1][1] < FLOWING_COUNT:
        return None
    since = samples[-1][0]
    for t, n in reversed(samples):
        if n != samples[-1][1]:
            break
        since = t
    return since


def active_time(samples: list[tuple[float, int]]) -> float | None:
    """From the first sample with records flowing to the last sample where counts changed."""
    first = next((t for t, n in samples if n >= FLOWING_COUNT), None)
    last, previous = None, None
    for t, n in samples:
        if previous is not None and n != previous:
            last = t
        previous = n
    if first is None or last is None:
        return None
    return max(last - first, 1.0)


# --- backfill -----------------------------------------------------------------------------


def make_unsigned_log(directory: Path, packets: int, addresses: int, skew: float) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_backfill import make_log

    return make_log(str(directory), packets, addresses, False, skew)


def summary_counts(output: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        s = json.loads((output / "summary.json").read_text())
        return {k: s.get(k) for k in ("records_in", "valid", "duplicates", "addresses", "windows")}
    return {}


def machine_figures(r: dict) -> str:
    """The machine during a run (a :class:`Meter`'s figures), for its printed line."""
    line = (
        f"load {r['load1_before']:.1f}->{r['load1_after']:.1f}, "
        f"machine {100 * r['machine_busy']:.0f}% busy, {100 * r['machine_iowait']:.0f}% "
        f"iowait, {100 * r['machine_steal']:.0f}% steal"
    )
    stalls = [
        f"{k} {r[f'{k}_stall_s']:.0f}" for k in ("cpu", "io", "memory") if f"{k}_stall_s" in r
    ]
    return line + ("; stalled s: " + ", ".join(stalls) if stalls else "")


def describe(r: dict, records: int) -> str:
    rate_wall = records / r["wall_s"]
    parts = [f"wall {r['wall_s']:.1f}s ({rate_wall:,.0f} rec/s)"]
    if "job_s" in r:
        parts.append(
            f"submit {r['submit_s']:.1f}s, Flink job {r['job_s']:.1f}s "
            f"({records / r['job_s']:,.0f} rec/s), after {r['after_s'] or 0:.1f}s"
        )
    cpu = [f"launcher tree {r['launcher_cpu_s']:.0f}"]
    for key in ("sdk_workers_cpu_s", "taskmanager_cpu_s"):
        if key in r:
            cpu.append(f"{key[:-6].replace('_', ' ')} {r[key]:.0f}")
    parts.append("CPU s: " + ", ".join(cpu))
    parts.append(machine_figures(r))
    if "probe_s" in r:
        parts.append(f"CPU probe {1000 * r['probe_s']:.0f} ms")
    return "; ".join(parts)


def cpu_probe(loops: int = 2_000_000) -> float:
    """Seconds of a fixed pure-Python loop, the best of three: how fast this (shared, drifting)
    machine runs Python right now, printed beside each run to tell its speed from the job's."""
    return min(_loop_seconds(loops) for _ in range(3))


def _loop_seconds(loops: int) -> float:
    """Seconds of a fixed pure-Python loop (the probes' workload)."""
    start = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i & 7
    return time.perf_counter() - start


def pair_probe(loops: int = 20_000_000, repeats: int = 4) -> dict:
    """The machine's own two-process speedup, the reference for p2 / p1: the same pure-Python
    loop in one process alone, then in two processes side by side, interleaved ``repeats``
    times. Two free, independent cores give 2.0x; where two busy vCPUs each run slower than
    one alone, no parallelism-2 job can do better than this."""
    return _pair(_loop_seconds, (loops,), repeats)


# The workload probe's input, read once per probe process (its reading is not timed).
_WORKLOAD: list[tuple[bytes, object, object]] = []


def _load_workload(pattern: str, records: int) -> None:
    """About ``records / files`` records from the start of each log file (whole runs)."""
    import glob

    import numpy as np

    from qis_beam.positions import HEADER_BYTES, iter_runs, open_log

    files = sorted(glob.glob(pattern))
    for path in files:
        taken = 0
        with open_log(path) as handle:
            for _, data, offsets, lengths in iter_runs(handle, 16384, 64 << 20):
                at = np.asarray(offsets, dtype=np.int64) + HEADER_BYTES
                _WORKLOAD.append((data, at, at + np.asarray(lengths, dtype=np.int64)))
                taken += len(offsets)
                if taken >= records // len(files):
                    break


def _workload_seconds(pattern: str, records: int) -> float:
    """Seconds of the pipeline's two heaviest kernels over about ``records`` packets of the log:
    validation's column checks (:func:`~qis_beam.validation.validate_many`), then the fold's
    column pass, fold and encoded partials (:class:`~qis_beam.partials.PacketColumns`)."""
    from qis_beam.partials import PacketColumns
    from qis_beam.validation import ValidationPolicy, validate_many
    from qis_beam.wire import scan_records

    if not _WORKLOAD:
        _load_workload(pattern, records)
    policy = ValidationPolicy(allow_unsigned=True)
    start = time.perf_counter()
    columns = PacketColumns(HOUR_MS)
    for data, starts, ends in _WORKLOAD:
        valid = validate_many(data, starts, ends, policy, policy.clock_ms()).valid
        s, e = starts[valid], ends[valid]
        columns.add_scanned(scan_records(data, s, e), partial(_payload_at, data, s, e))
    windowed, all_time = columns.fold()
    for synthesis in [*windowed.values(), *all_time.values()]:
        synthesis.to_bytes()
    return time.perf_counter() - start


def _payload_at(data: bytes, starts, ends, row: int) -> bytes:
    from qis_beam.wire import payload_of

    return payload_of(data[starts[row] : ends[row]])


def workload_pair_probe(pattern: str, records: int = 400_000, repeats: int = 4) -> dict:
    """:func:`pair_probe` with the pipeline's own kernels on this input instead of a loop
    (:func:`_workload_seconds`): numpy over large columns, dicts of many partials. Where two
    such processes slow each other down (shared cache, memory bandwidth, the host), this is
    the bound a parallelism-2 job meets, however well its stages split."""
    return _pair(_workload_seconds, (pattern, records), repeats)


def _pair(fn, args: tuple, repeats: int) -> dict:
    """``fn(*args)`` in one process alone, then in two side by side, ``repeats`` times
    interleaved; both workers run it once untimed first (imports, input, warm memory)."""
    alone, pair = [], []
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.starmap(fn, [args, args], chunksize=1)
        for _ in range(repeats):
            alone.append(pool.apply(fn, args))
            pair.extend(pool.starmap(fn, [args, args], chunksize=1))
    a, b = statistics.mean(alone), statistics.mean(pair)
    return {"alone_s": round(a, 3), "pair_s": round(b, 3), "speedup": round(2 * a / b, 3)}


def bench_backfill(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="qis-flink-bench-"))
    logs = Path(args.work_dir)
    pattern = make_unsigned_log(
        logs / f"unsigned-{args.packets}-{args.addresses}-{args.skew}",
        args.packets,
        args.addresses,
        args.skew,
    )
    base_pattern = None
    if args.baseline_packets:
        base_pattern = make_unsigned_log(
            logs / f"unsigned-{args.baseline_packets}-{args.addresses}-{args.skew}",
            args.baseline_packets,
            args.addresses,
            args.skew,
        )
    jar = job_server_jar(args.job_server_jar)
    parallelisms = [int(p) for p in args.parallelism.split(",") if p]
    report: dict = {"packets": args.packets, "environment": args.environment, "runs": []}
    print(
        f"Flink backfill benchmark: {args.packets} unsigned packets, {args.addresses} addresses "
        f"(zipf {args.skew}), {os.cpu_count()} cores, environment {args.environment}, "
        f"job server {jar}",
        flush=True,
    )
    common = ["backfill", "--allow-unsigned", "--quiet"]
    records = None

    def record(r: dict, label: str, n: int) -> None:
        r["label"] = label
        report["runs"].append(r)
        print(f"  {label:<28}: {describe(r, n)}", flush=True)

    try:
        if args.fnapi:
            for run in range(args.runs):
                out = work / f"fnapi-{run}"
                r = launch(
                    [*common, "--input", pattern, "--output", str(out), "--runner", "FnApiRunner"],
                    work,
                    f"fnapi-{run}",
                    args.timeout,
                )
                r["counts"] = summary_counts(out)
                records = r["counts"].get("records_in") or records
                record(r, f"FnApiRunner, 1 worker #{run + 1}", records or args.packets)
        with local_stack(work, ["flink"], args.flink_conf) as started:
            piece = started["flink"].piece
            rest, pids, pool = flink_handles(piece, args.environment)

            def flink_run(p: int, name: str, input_pattern: str) -> dict:
                out = work / name
                beam = flink_args(piece.endpoints["flink_master"], jar, p, pool)
                argv = [*common, "--input", input_pattern, "--output", str(out), *beam]
                probe = cpu_probe()
                r = launch(argv, work, name, args.timeout, rest, pids)
                r["probe_s"] = probe
                r["counts"], r["parallelism"] = summary_counts(out), p
                return r

            for p in parallelisms if base_pattern else ():
                r = flink_run(p, f"flink-p{p}-baseline", base_pattern)
                r["baseline"] = True
                n0 = r["counts"].get("records_in") or args.baseline_packets
                record(r, f"Flink p{p} baseline ({n0})", n0)
            # Rounds of one run per parallelism: this machine's speed drifts by a quarter
            # within minutes, so p1 and p2 run side by side in time, not one block each.
            for run in range(args.runs):
                if {1, 2} <= set(parallelisms):
                    machine = pair_probe()
                    kernels = workload_pair_probe(pattern)
                    machine["round"] = kernels["round"] = run
                    report.setdefault("machine_pairs", []).append(machine)
                    report.setdefault("workload_pairs", []).append(kernels)
                    print(
                        f"  machine, round {run + 1}: two processes side by side each run "
                        f"a Python loop in {machine['pair_s']:.2f}s (alone "
                        f"{machine['alone_s']:.2f}s: {machine['speedup']:.2f}x for two) and "
                        f"the pipeline's kernels in {kernels['pair_s']:.2f}s (alone "
                        f"{kernels['alone_s']:.2f}s: {kernels['speedup']:.2f}x)",
                        flush=True,
                    )
                for p in parallelisms:
                    r = flink_run(p, f"flink-p{p}-{run}", pattern)
                    r["round"] = run
                    records = r["counts"].get("records_in") or records
                    record(r, f"Flink p{p} #{run + 1}", records or args.packets)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    summarize_backfill(report, records or args.packets)
    return report


def round_ratios(runs: list[dict]) -> list[float]:
    """p1 job time / p2 job time of each round (runs of the two that ran back to back)."""
    jobs: dict[int, dict[int, float]] = {}
    for r in runs:
        if "round" in r:
            jobs.setdefault(r["round"], {})[r["parallelism"]] = r["job_s"]
    return [j[1] / j[2] for _, j in sorted(jobs.items()) if 1 in j and 2 in j]


def summarize_backfill(report: dict, records: int) -> None:
    runs = report["runs"]
    base = {r["parallelism"]: r for r in runs if r.get("baseline")}
    rates: dict[int, list[float]] = {}
    marginal: dict[int, list[float]] = {}
    print(f"\n[summary] {records} records")
    for r in runs:
        if "parallelism" not in r or r.get("baseline"):
            continue
        p = r["parallelism"]
        rates.setdefault(p, []).append(records / r["job_s"])
        b = base.get(p)
        if b and r["job_s"] > b["job_s"]:
            n0 = b["counts"].get("records_in") or 0
            marginal.setdefault(p, []).append((records - n0) / (r["job_s"] - b["job_s"]))
    for p in sorted(rates):
        line = f"  p{p}: Flink job {', '.join(f'{x:,.0f}' for x in rates[p])} rec/s"
        if p in marginal:
            line += f"; marginal (baseline job {base[p]['job_s']:.1f}s taken out) "
            line += ", ".join(f"{x:,.0f}" for x in marginal[p]) + " rec/s"
        print(line)
    if 1 in rates and 2 in rates:
        best = max(rates[2]) / max(rates[1])
        print(f"  p2 / p1 (best job rates): {best:.2f}x (goal >= 1.6x)")
        report["p2_over_p1"] = best
        rounds = round_ratios(runs)
        if rounds:
            print(
                f"  p2 / p1 per round: {', '.join(f'{x:.2f}x' for x in rounds)}; "
                f"median {statistics.median(rounds):.2f}x"
            )
            report["p2_over_p1_rounds"] = rounds
            for key, what in (("machine", "a Python loop"), ("workload", "the kernels")):
                pairs = [m["speedup"] for m in report.get(f"{key}_pairs", [])]
                if len(pairs) != len(rounds):
                    continue
                shares = [r / m for r, m in zip(rounds, pairs, strict=True)]
                print(
                    f"  two processes against one, {what}, same rounds: "
                    f"{', '.join(f'{m:.2f}x' for m in pairs)}; median "
                    f"{statistics.median(pairs):.2f}x. p2 / p1 as a share of it: "
                    f"{', '.join(f'{x:.0%}' for x in shares)}; median "
                    f"{statistics.median(shares):.0%}"
                )
                report[f"p2_over_p1_share_of_{key}"] = shares
        if 1 in marginal and 2 in marginal:
            m = max(marginal[2]) / max(marginal[1])
            print(f"  p2 / p1 (best marginal rates): {m:.2f}x")
            report["p2_over_p1_marginal"] = m
    fn = [r for r in runs if r["label"].startswith("FnApiRunner")]
    if fn:
        walls = ", ".join(f"{records / r['wall_s']:,.0f}" for r in fn)
        print(f"  FnApiRunner: {walls} rec/s (wall)")


# --- stream -------------------------------------------------------------------------------


def stream_records(directory: Path, packets: int, seed: int) -> list[tuple[bytes, int | None]]:
    """A swarm with recent event times (2 h span ending 1 h ago) in arrival order, each with
    its Kafka record timestamp (its event time; never ahead of the clock)."""
    from qis_beam.sim import SwarmConfig, simulate
    from qis_beam.sim.sending import log_records
    from qis_beam.transports import record_meta

    now_ms = int(time.time() * 1000)
    report = simulate(
        str(directory),
        SwarmConfig(
            packets=packets,
            addresses=1000,
            nodes=1000,
            address_skew=1.1,
            signed=False,
            seed=seed,
            start_ms=now_ms - 3 * HOUR_MS,
            span_ms=2 * HOUR_MS,
            shards=1,
        ),
    )
    # A malformed packet from the future (the simulator writes some) keeps the previous
    # record's timestamp: stamped "now" it would move the reader's watermark past the whole
    # 2 h backlog and make everything after it too late.
    out, last = [], now_ms - 3 * HOUR_MS
    for record in log_records(report.shard_files):
        event_ms = record_meta(record).event_time_ms
        stamp = last if not event_ms or event_ms > now_ms else event_ms
        last = max(last, stamp)
        out.append((record, stamp))
    return out


def publish(bootstrap: str, topic: str, records) -> float:
    from qis_beam.transports import open_transport

    started = time.perf_counter()
    with open_transport(f"kafka://{bootstrap}/{topic}") as transport:
        for record, event_ms in records:
            transport.publish(record, event_time_ms=event_ms)
        transport.flush()
    return len(records) / (time.perf_counter() - started)


def state_sizes(metrics: dict) -> dict[str, dict]:
    """The ``qis/state_bytes.<step>`` distributions by step, from the PipelineResult
    (``qis/state_bytes.all_time.pending``) or from Flink's REST API
    (``qis_state_bytes_all_time_pending``: Flink's spelling of the same metric)."""
    from qis_beam.transforms.streaming.sizes import STATE_BYTES_PREFIX

    out = {}
    for name, d in (metrics.get("distributions") or {}).items():
        short = name.split("/", 1)[-1]
        if short.startswith(STATE_BYTES_PREFIX):
            out[short[len(STATE_BYTES_PREFIX) :]] = d
        elif name.startswith("qis_state_bytes_"):
            step = name[len("qis_state_bytes_") :]
            out[step.replace("all_time_", "all_time.").replace("windowed_", "windowed.")] = d
    return out


def counter(metrics: dict, name: str) -> int | None:
    """A ``qis/NAME`` counter from either source (see :func:`state_sizes`)."""
    counters = metrics.get("counters") or {}
    return counters.get(f"qis/{name}", counters.get(f"qis_{name}"))


def bench_stream(args) -> dict:
    from qis_beam.stack.kafka import create_topic

    work = Path(tempfile.mkdtemp(prefix="qis-flink-stream-"))
    jar = job_server_jar(args.job_server_jar)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    parallelisms = [int(p) for p in args.parallelism.split(",") if p]
    report: dict = {"environment": args.environment, "runs": []}
    print(
        f"Flink stream benchmark: sizes {sizes}, parallelism {parallelisms}, environment "
        f"{args.environment}, {args.partitions} partitions, job server {jar}",
        flush=True,
    )
    try:
        with local_stack(work, ["kafka", "flink"], args.flink_conf) as started:
            bootstrap = started["kafka"].piece.endpoints["bootstrap"]
            piece = started["flink"].piece
            rest, pids, pool = flink_handles(piece, args.environment)
            for size in sizes:
                t0 = time.perf_counter()
                records = stream_records(work / f"swarm-{size}", size, args.seed)
                topic = f"bench-{size}-{int(time.time())}"
                create_topic(bootstrap, topic, partitions=args.partitions)
                rate = publish(bootstrap, topic, records)
                print(
                    f"  {size}: {len(records)} records simulated and published in "
                    f"{time.perf_counter() - t0:.0f}s ({rate:,.0f}/s to Kafka)",
                    flush=True,
                )
                for p in parallelisms:
                    for run in range(args.runs):
                        name = f"stream-{size}-p{p}-{run}"
                        argv = [
                            *["run", "--source", "kafka", "--input-topic", topic],
                            *["--bootstrap-servers", bootstrap],
                            *["--output", str(work / name), "--allow-unsigned"],
                            *["--flush-every", "30s", "--wait"],
                            *flink_args(piece.endpoints["flink_master"], jar, p, pool),
                        ]
                        if args.checkpoint_ms:
                            argv.append(f"--checkpointing_interval={args.checkpoint_ms}")
                        if args.stop_when_idle:
                            argv += ["--kafka-stop-when-idle", args.stop_when_idle]
                        if args.shutdown_idle_ms:
                            argv.append(f"--shutdown_sources_after_idle_ms={args.shutdown_idle_ms}")
                        r = launch(
                            argv,
                            work,
                            name,
                            args.timeout,
                            rest,
                            pids,
                            drain_quiet_s=None if args.shutdown_idle_ms else args.drain_quiet,
                            sample_every_s=args.sample_every,
                        )
                        r.update(size=size, records=len(records), parallelism=p)
                        report["runs"].append(r)
                        print_stream(r)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    summarize_stream(report)
    return report


def print_stream(r: dict) -> None:
    metrics = r.get("metrics") or {}
    records_in = counter(metrics, "records_in")
    active = r.get("active_s")
    sizes = state_sizes(metrics)
    valid, late = counter(metrics, "valid"), counter(metrics, "dead_letter.too_late")
    if late is None:
        late = counter(metrics, "dead_letter_too_late")
    line = (
        f"  {r['records']:>7} records p{r['parallelism']}: records_in={records_in} "
        f"valid={valid} too_late={late} "
        f"wall {r['wall_s']:.0f}s, submit {r.get('submit_s', 0):.0f}s, Flink job "
        f"{r.get('job_s', 0):.0f}s, active {active or 0:.0f}s"
    )
    if records_in and active:
        line += f" -> {records_in / active:,.0f} rec/s"
    print(line, flush=True)
    if metrics.get("error"):
        print(f"    metrics: {metrics['error']}")
    print(
        "    largest state value per key (bytes): "
        + (", ".join(f"{k} {d['max']}" for k, d in sorted(sizes.items())) or "none reported")
    )
    cpu = ", ".join(
        f"{k[:-6]} {r[k]:.0f}"
        for k in ("launcher_cpu_s", "sdk_workers_cpu_s", "taskmanager_cpu_s")
        if k in r
    )
    print(f"    CPU s: {cpu}; {machine_figures(r)}", flush=True)


def summarize_stream(report: dict) -> None:
    runs = report["runs"]
    if not runs:
        return
    print("\n[summary] largest state value per key by size (max of qis/state_bytes.*)")
    by_size: dict[int, dict[str, int]] = {}
    for r in runs:
        for step, d in state_sizes(r.get("metrics") or {}).items():
            by_size.setdefault(r["size"], {})[step] = max(
                by_size.get(r["size"], {}).get(step, 0), d["max"]
            )
    sizes = sorted(by_size)
    for size in sizes:
        print(f"  {size:>7}: {by_size[size]}")
    if len(sizes) >= 2:
        small, large = by_size[sizes[0]], by_size[sizes[-1]]
        for step in sorted(large):
            if small.get(step):
                print(f"  {step}: {large[step] / small[step]:.2f}x from {sizes[0]} to {sizes[-1]}")


# --- command line -------------------------------------------------------------------------


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_cli":
        return cli_with_metrics(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("backfill", "stream"):
        p = sub.add_parser(mode)
        p.add_argument("--job-server-jar", help="default: $QIS_FLINK_JOB_SERVER_JAR / profile")
        p.add_argument(
            "--environment",
            choices=("external", "loopback"),
            default="external" if mode == "backfill" else "loopback",
            help="SDK worker pool (one process per --sdk_worker_parallelism) or LOOPBACK "
            "(default: external for backfill, loopback for stream: faster there, see the notes)",
        )
        p.add_argument("--runs", type=int, default=1, help="runs of each configuration")
        p.add_argument("--timeout", type=float, default=1800.0, help="s per run")
        p.add_argument(
            "--flink-conf",
            action="append",
            default=None,
            help=f"KEY=VALUE added to Flink's configuration (default: {DEFAULT_FLINK_CONF}); "
            "'none' for the stack's own",
        )
        p.add_argument(
            "--beam-arg",
            action="append",
            default=[],
            help="an extra Beam/Flink option for every Flink run, e.g. "
            "--beam-arg=--max_bundle_size=5000",
        )
        p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
        p.add_argument("--json", help="also write the figures to this file")
    b = sub.choices["backfill"]
    b.add_argument("--packets", type=int, default=1_000_000)
    b.add_argument("--addresses", type=int, default=1000)
    b.add_argument("--skew", type=float, default=1.1)
    b.add_argument("--parallelism", default="1,2")
    b.add_argument("--baseline-packets", type=int, default=2000, help="0: no baseline run")
    b.add_argument("--no-fnapi", dest="fnapi", action="store_false", help="skip FnApiRunner")
    b.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "qis-bench"))
    s = sub.choices["stream"]
    s.add_argument("--sizes", default="50000,200000,800000")
    s.add_argument("--parallelism", default="2")
    s.add_argument("--partitions", type=int, default=4)
    s.add_argument("--seed", type=int, default=5)
    s.add_argument(
        "--sample-every",
        type=float,
        default=60.0,
        help="s between progress samples (records in, largest state values) of a running "
        "job, appended to <work>/<run>.samples.jsonl (see --keep); 0: none",
    )
    s.add_argument(
        "--checkpoint-ms",
        type=int,
        default=60_000,
        help="Flink checkpoint interval (default: the `flink` profile's 60 s; `local-flink` "
        "checkpoints every 10 s for its recovery test, which a large state cannot keep up "
        "with); 0: the profile's",
    )
    s.add_argument(
        "--stop-when-idle",
        default="",
        help="qis-beam run --kafka-stop-when-idle (default: not passed; `run` refuses it on "
        "Flink, the job runs unbounded and is ended once quiet)",
    )
    s.add_argument(
        "--shutdown-idle-ms",
        type=int,
        default=0,
        help="end the job with --shutdown_sources_after_idle_ms=N instead (loses what the "
        "reader defers past N ms after the start: see the module doc)",
    )
    s.add_argument(
        "--end",
        choices=("cancel", "savepoint", "drain"),
        default="cancel",
        help="how the quiet job ends once its metrics are read: cancel; stop with a savepoint "
        "(never completed here while the reader had a backlog); stop with drain (fires every "
        "pending timer)",
    )
    s.add_argument(
        "--drain-quiet",
        type=float,
        default=120.0,
        help="stop the job once no record moved for this many seconds (longer than a "
        "checkpoint: an 800k run's took 30-40 s, during which nothing moves)",
    )
    args = parser.parse_args()
    EXTRA_BEAM_ARGS.extend(args.beam_arg)
    END[0] = getattr(args, "end", "cancel")
    if args.flink_conf is None:
        args.flink_conf = list(DEFAULT_FLINK_CONF)
    # Ctrl-C and SIGTERM unwind through every `finally` (processes, stack).
    signal.signal(signal.SIGTERM, _interrupt)
    report = bench_backfill(args) if args.mode == "backfill" else bench_stream(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
