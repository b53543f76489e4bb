"""Serving load on loopback: Recommend through `qis-beam serve` vs plain psycopg, same rows.

    python benchmarks/bench_serve.py                 # 30 s per kind, in 3 alternating rounds
    python benchmarks/bench_serve.py --duration 10 --postgres-url postgresql://qis@127.0.0.1:PORT/qis
    python benchmarks/bench_serve.py --profile-server /tmp/serve.stacks   # py-spy, collapsed

Loads ``--addresses`` (10k) all-time syntheses into a fresh PostgreSQL database (the given
server, e.g. ``qis-beam stack up``'s, or a private one started here with initdb as in
tests/pg_local.py), starts ``qis-beam serve`` on it in its own process(es), then measures
``--clients`` (16) concurrent clients in a closed loop, two kinds:

  * ``Recommend``: each client asks qis_beam.client.IntelligenceClient.recommend(template,
    context, k=5) for a random address (the server derives the address, reads the row,
    ranks, answers);
  * ``psycopg``: each client derives the same address, runs the same row's SELECT on its own
    connection and decodes the JSON record (what a node reading the database would do).

Each kind gets ``--duration`` seconds, split into ``--rounds`` windows that alternate
between the kinds, so load from outside the benchmark weighs on both alike. Every client
connects and answers once before a window opens; all processes measure the same seconds.
Clients are spread over ``--processes`` processes (threads within each), so the client side
is not one GIL. Prints requests/s, p50 and p99 latency of each, the ratio (issue 10's goal:
the service >= 0.5x the direct queries' rate, p99 <= 25 ms), and CPU microseconds per request
spent by the clients, the server, PostgreSQL (when started here) and everything else on the
machine. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # serving_data, pg_local

from serving_data import TEMPLATE, address_of, problem, records_for  # noqa: E402

SELECT = "SELECT record FROM synthesis WHERE address = %s AND window_start_ms = -1"


def populate(url: str, addresses: int) -> None:
    from qis_beam.store import open_store

    with open_store(url, create=True) as store:
        batch = []
        for i in range(addresses):
            batch.append(records_for(i, packets=30)[0])  # the all-time row
            if len(batch) == 1000:
                store.load(batch, "bench")
                batch = []
        store.load(batch, "bench")


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _client_process(kind, target, threads, addresses, seed, ready, go, window, out):
    """One process: ``threads`` clients in a closed loop; puts latencies (s) of the window.

    Every client connects and makes a first call, waits at ``ready`` (a barrier with the
    parent), then at ``go``; the parent then has set ``window`` to the (start, end) of the
    measured window on the shared monotonic clock, so all processes measure the same seconds.
    """
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def run(n: int):
        rng = random.Random(seed * 1000 + n)
        mine: list[float] = []
        if kind == "grpc":
            from qis_beam.client import IntelligenceClient

            client = IntelligenceClient(target, timeout=5)
            call = lambda i: client.recommend(TEMPLATE, problem(i), k=5)  # noqa: E731
        else:
            import psycopg

            conn = psycopg.connect(target, autocommit=True)

            def call(i):
                row = conn.execute(SELECT, (address_of(i),)).fetchone()
                return json.loads(row[0])["approaches"][:5]

        call(rng.randrange(addresses))
        ready.wait()
        go.wait()
        start, end = window[0], window[1]
        while True:
            i = rng.randrange(addresses)
            t0 = time.monotonic()
            if t0 >= end:
                break
            try:
                call(i)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    errors[0] += 1
                continue
            t1 = time.monotonic()
            if t0 >= start:
                mine.append(t1 - t0)
        with lock:
            latencies.extend(mine)

    cpu = []

    def meter():  # this process's CPU (all threads) over the measured window
        go.wait()
        start, end = window[0], window[1]
        time.sleep(max(0.0, start - time.monotonic()))
        cpu.append(time.process_time())
        time.sleep(max(0.0, end - time.monotonic()))
        cpu.append(time.process_time())

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    pool.append(threading.Thread(target=meter))
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, errors[0], cpu[1] - cpu[0]))


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (server processes, PostgreSQL backends)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields:
                parents[int(name)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                frontier.append(child)
    return sorted(found)


def _cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) per live process."""
    out = {}
    for pid in pids:
        fields = _stat(pid)
        if fields:
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _TICK, sum(values) / _TICK


class Meter:
    """CPU of the server's and PostgreSQL's process trees and the whole machine over a window
    (a process first seen at the end started inside it: all its CPU counts; one that ended
    inside it is missed)."""

    def __init__(self, roots: dict[str, int | None]):
        self.roots = {k: v for k, v in roots.items() if v}

    def sample(self):
        return {k: _cpu(_tree(root)) for k, root in self.roots.items()}, _machine_busy()

    @staticmethod
    def delta(before, after) -> dict[str, float]:
        (trees0, (busy0, all0)), (trees1, (busy1, all1)) = before, after
        out = {k: sum(t - trees0[k].get(pid, 0.0) for pid, t in trees1[k].items()) for k in trees1}
        out["machine_busy"] = busy1 - busy0
        out["machine_total"] = all1 - all0
        return out


def phase(kind, target, clients, processes, addresses, duration, meter=None, spy=None):
    """One window of ``duration`` s: (latencies, errors, CPU seconds by who spent them)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    ready, go, window = ctx.Barrier(clients + 1), ctx.Event(), ctx.Array("d", 2)
    procs = [
        ctx.Process(
            target=_client_process,
            args=(kind, target, n, addresses, seed, ready, go, window, out),
        )
        for seed, n in enumerate(per)
        if n
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=120)  # every client imported, connected and answered once
    opened = time.monotonic() + 1.0  # a second of full load before the window
    window[0], window[1] = opened, opened + duration
    go.set()
    time.sleep(max(0.0, opened - time.monotonic()))
    before = meter.sample() if meter else None
    spying = spy(duration) if spy else None
    time.sleep(max(0.0, opened + duration - time.monotonic()))
    cpu = Meter.delta(before, meter.sample()) if meter else {}
    latencies, errors = [], 0
    for _ in procs:
        got, failed, client_cpu = out.get()
        latencies.extend(got)
        errors += failed
        cpu["clients"] = cpu.get("clients", 0.0) + client_cpu
    for p in procs:
        p.join()
    if spying is not None:
        spying.wait()
    return latencies, errors, cpu


def summary(windows: list[tuple[list[float], int, dict]], duration: float) -> dict:
    latencies = sorted(x for w in windows for x in w[0])
    cpu: dict[str, float] = {}
    for _, _, window_cpu in windows:
        for k, v in window_cpu.items():
            cpu[k] = cpu.get(k, 0.0) + v
    n = max(1, len(latencies))
    machine = {k: cpu.pop(k) for k in ("machine_busy", "machine_total") if k in cpu}
    # CPU microseconds per answered request, by who spent them; "other" is the rest of the
    # machine (other work sharing the cores; loopback networking in the kernel is not charged
    # to a process).
    cpu_us = {k: 1e6 * v / n for k, v in cpu.items()}
    if machine:
        cpu_us["other"] = 1e6 * (machine["machine_busy"] - sum(cpu.values())) / n
        cpu_us["machine_busy_pct"] = 100 * machine["machine_busy"] / machine["machine_total"]
    return {
        "requests": len(latencies),
        "errors": sum(w[1] for w in windows),
        "rps": len(latencies) / duration,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "cpu_us_per_request": {k: round(v, 1) for k, v in cpu_us.items()},
    }


def start_server(url: str, workers: int, processes: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qis_beam.cli",
            "serve",
            "--store",
            url,
            "--port",
            "0",
            "--workers",
            str(workers),
            "--processes",
            str(processes),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    if " on " not in line:
        process.kill()
        raise RuntimeError(f"serve did not start: {line!r}")
    return process, line.split(" on ", 1)[1].split(" ", 1)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=os.environ.get("QIS_POSTGRES_URL"))
    parser.add_argument("--addresses", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per kind")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating windows per kind (duration split)"
    )
    parser.add_argument("--server-workers", type=int, default=8, help="serve --workers")
    parser.add_argument("--server-processes", type=int, default=1, help="serve --processes")
    parser.add_argument(
        "--profile-server",
        metavar="FILE",
        help="py-spy record the server during the Recommend phase (collapsed stacks to FILE)",
    )
    args = parser.parse_args()

    private = None
    from pg_local import LocalPostgres, fresh_database

    if args.postgres_url:
        server_url = args.postgres_url
    else:
        private = LocalPostgres().start()
        server_url = private.url
    serve = None
    try:
        url = fresh_database(server_url)
        t = time.monotonic()
        populate(url, args.addresses)
        print(f"loaded {args.addresses} addresses in {time.monotonic() - t:.1f}s", flush=True)
        serve, target = start_server(url, args.server_workers, args.server_processes)
        meter = Meter({"server": serve.pid, "postgres": private.process.pid if private else None})
        spy = None
        if args.profile_server:
            spy = lambda seconds: subprocess.Popen(  # noqa: E731
                ["py-spy", "record", "--pid", str(serve.pid), "--subprocesses", "--nonblocking"]
                + ["--duration", str(int(seconds)), "--format", "raw"]
                + ["--output", args.profile_server],
                stdout=subprocess.DEVNULL,
            )
        # Rounds alternate the two kinds, so load from outside the benchmark that comes and
        # goes weighs on both alike; each kind gets --duration seconds in total.
        windows: dict[str, list] = {"grpc": [], "psycopg": []}
        slice_s = args.duration / args.rounds
        for round_no in range(args.rounds):
            for kind, where in (("grpc", target), ("psycopg", url)):
                windows[kind].append(
                    phase(
                        kind,
                        where,
                        args.clients,
                        args.processes,
                        args.addresses,
                        slice_s,
                        meter,
                        spy if kind == "grpc" and round_no == 0 else None,
                    )
                )
        results = {kind: summary(w, args.duration) for kind, w in windows.items()}
        for kind, r in results.items():
            name = "Recommend (gRPC)" if kind == "grpc" else "psycopg SELECT"
            print(
                f"{name:17s} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                f"p99 {r['p99_ms']:6.2f} ms  ({r['requests']} requests, {r['errors']} errors)",
                flush=True,
            )
            cpu = r["cpu_us_per_request"]
            print(
                "    CPU us/request: "
                + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if k != "machine_busy_pct")
                + f" (machine {cpu.get('machine_busy_pct', 0):.0f}% busy)",
                flush=True,
            )
        ratio = results["grpc"]["rps"] / results["psycopg"]["rps"]
        print(f"service / direct queries: {ratio:.2f}x the rate")
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "server_processes": args.server_processes,
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "addresses": args.addresses,
                    "cpus": os.cpu_count(),
                    "ratio": ratio,
                    **results,
                }
            )
        )
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(timeout=20)
        if private is not None:
            private.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
