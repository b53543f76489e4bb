"""Serving load on loopback: Recommend through `qis-beam serve` vs plain psycopg, same rows.

    python benchmarks/bench_serve.py                                   # 30 s per phase
    python benchmarks/bench_serve.py --duration 10 --postgres-url postgresql://qis@127.0.0.1:PORT/qis

Loads ``--addresses`` (10k) all-time syntheses into a fresh PostgreSQL database (the given
server, e.g. ``qis-beam stack up``'s, or a private one started here with initdb as in
tests/pg_local.py), starts ``qis-beam serve`` on it in its own process(es), then runs two
phases of ``--clients`` (16) concurrent clients for ``--duration`` seconds each (after warm-up):

  * ``Recommend``: each client asks qis_beam.client.IntelligenceClient.recommend(template,
    context, k=5) for a random address (the server derives the address, reads the row,
    ranks, answers);
  * ``psycopg``: each client runs the same row's SELECT on its own connection and decodes the
    JSON record (what a node reading the database directly would do).

Clients are spread over ``--processes`` processes (threads within each), so the client side
is not one GIL. Prints requests/s, p50 and p99 latency of each, and the ratio (issue 10's
goal: the service >= 0.5x the direct queries' rate, p99 <= 25 ms). A measurement, never a test.
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


def _client_process(kind, target, threads, addresses, warmup, duration, seed, out):
    """One process: ``threads`` clients in a closed loop; puts latencies (s) of the window."""
    start = time.monotonic() + warmup
    end = start + duration
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

    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((latencies, errors[0]))


def phase(kind, target, clients, processes, addresses, duration) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    # spawned processes import everything first: give them time before the window opens
    warmup = 4.0
    procs = [
        ctx.Process(
            target=_client_process,
            args=(kind, target, n, addresses, warmup, duration, seed, out),
        )
        for seed, n in enumerate(per)
        if n
    ]
    for p in procs:
        p.start()
    latencies, errors = [], 0
    for _ in procs:
        got, failed = out.get()
        latencies.extend(got)
        errors += failed
    for p in procs:
        p.join()
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50_ms": 1000 * _percentile(latencies, 0.50),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "mean_ms": 1000 * statistics.fmean(latencies),
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
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--server-workers", type=int, default=8, help="serve --workers")
    parser.add_argument("--server-processes", type=int, default=1, help="serve --processes")
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
        results = {}
        for kind, where in (("grpc", target), ("psycopg", url)):
            results[kind] = phase(
                kind, where, args.clients, args.processes, args.addresses, args.duration
            )
            r = results[kind]
            name = "Recommend (gRPC)" if kind == "grpc" else "psycopg SELECT"
            print(
                f"{name:17s} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                f"p99 {r['p99_ms']:6.2f} ms  ({r['requests']} requests, {r['errors']} errors)",
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
