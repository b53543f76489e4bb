"""Freshness on the local stack: from a packet's publish to the moment GetSynthesis counts it.

    python benchmarks/bench_freshness.py            # Flink, 50 packets/s for 60 s, --emit-every 5s
    python benchmarks/bench_freshness.py --rate 200 --duration 60 --emit-every 5s \
        --watermark-delay 5s
    python benchmarks/bench_freshness.py --runner prism --rate 20 --duration 120

Starts Kafka, PostgreSQL and (``--runner flink``, the default) Flink with ``qis_beam.stack``
(a fresh state folder, stopped at the end), then ``qis-beam run --source kafka`` upserting
into PostgreSQL -- on the stack's Flink session cluster with ``--profile local-flink``
(LOOPBACK SDK harness in the launcher, ``--parallelism`` 2 by default; the job-server jar from
``--job-server-jar``, else ``$QIS_FLINK_JOB_SERVER_JAR``, the profile or ``qis-beam stack
fetch``'s cache), or on Prism (``--runner prism``) -- and ``qis-beam serve`` on that database.
At the end the launcher (with the job server it started) is stopped by its PID and any job it
left on the cluster is cancelled over Flink's REST API. Signed packets for ``--problems`` fresh
addresses (a random context value per run, so every count starts at 0) are published at
``--rate`` packets/s to a ``--partitions`` topic, keyed by address (an address's packets stay
in order).

A poller asks ``GetSynthesis`` for every address every ``--poll`` seconds. The all-time
synthesis of an address counts its valid packets (``n_packets``); when it first reaches
``c``, the address's packets 1..c are counted, and each one's delay is that moment minus its
publish time. Prints p50/p99 of the delays, how many were counted, the publish rate achieved
and the rate at which the store's counts grew. A measurement, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOUR_MS = 3_600_000
TEMPLATE = "llm-finetune/v1"
APPROACHES = ("lr_schedule=cosine", "lr_schedule=linear", "lr_schedule=wsd")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Packets:
    """Signed packets of ``problems`` fresh problems from ``nodes`` registered nodes."""

    def __init__(self, problems: int, nodes: int, registry: Path):
        from qis_beam.address import semantic_address
        from qis_beam.signing import NodeKey

        run = secrets.token_hex(4)
        self.contexts = [
            {"task": "causal-lm", "dataset": f"fresh-{run}-{i}", "params": "1e9"}
            for i in range(problems)
        ]
        self.addresses = [semantic_address(TEMPLATE, c) for c in self.contexts]
        self.keys = [NodeKey.generate() for _ in range(nodes)]
        registry.write_text("".join(k.public_key.hex() + "\n" for k in self.keys))
        self._n = 0

    def next(self, problem: int) -> tuple[bytes, int]:
        from qis_beam.emitter import build_packet, seal

        self._n += 1
        key = self.keys[self._n % len(self.keys)]
        now_ms = int(time.time() * 1000)
        packet = build_packet(
            key=key,
            address=self.addresses[problem],
            template_id=TEMPLATE,
            approach_id=APPROACHES[self._n % len(APPROACHES)],
            outcome_type=1 + self._n % 3,
            outcome_delta=0.01 * (self._n % 7),
            confidence=0.8,
            event_time_ms=now_ms,
            emit_time_ms=now_ms,
        )
        return seal(key, packet), now_ms


class Poller(threading.Thread):
    """Polls GetSynthesis for every address; records when each count was first seen."""

    def __init__(self, target: str, addresses: list[str], period: float):
        super().__init__(daemon=True)
        self.target, self.addresses, self.period = target, addresses, period
        self.seen: dict[str, list[tuple[int, float]]] = {a: [] for a in addresses}
        self.stop = threading.Event()
        self.polls = 0

    def count(self, address: str) -> int:
        return self.seen[address][-1][0] if self.seen[address] else 0

    def run(self) -> None:
        from qis_beam.client import IntelligenceClient, NotFound, QueryError

        with IntelligenceClient(self.target, timeout=2.0) as client:
            while not self.stop.is_set():
                t0 = time.time()
                for address in self.addresses:
                    try:
                        n = client.synthesis(address).n_packets
                    except NotFound:
                        continue
                    except QueryError:  # UNAVAILABLE before the first write creates the table
                        continue
                    if n > self.count(address):
                        self.seen[address].append((n, time.time()))
                self.polls += 1
                self.stop.wait(max(0.0, self.period - (time.time() - t0)))


def delays(published: dict[str, list[float]], seen: dict[str, list[tuple[int, float]]]):
    """Per packet: first time its address's count reached its position, minus publish."""
    out = []
    for address, times in published.items():
        counts = seen[address]
        j = 0
        for k, sent in enumerate(times, start=1):
            while j < len(counts) and counts[j][0] < k:
                j += 1
            if j == len(counts):
                break  # not counted (yet)
            out.append(counts[j][1] - sent)
    return out


def runner_args(args, flink_master: str | None) -> list[str]:
    """Beam arguments of the job: Flink (local-flink profile) or Prism."""
    if args.runner == "flink":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_flink import job_server_jar

        return [
            "--profile",
            "local-flink",
            f"--flink_master={flink_master}",
            f"--flink_job_server_jar={job_server_jar(args.job_server_jar)}",
            f"--parallelism={args.parallelism}",
        ]
    from qis_beam import stack

    return [
        "--runner",
        "PrismRunner",
        f"--prism_location={stack.prism_path()}",
        # apache/beam#35771 (see the local-prism profile): never split a stateful bundle.
        "--experiments=prism_disable_sdf_split",
    ]


def start_job(args, bootstrap, topic, store_url, work: Path, registry: Path, beam: list[str]):
    command = [
        sys.executable,
        "-m",
        "qis_beam.cli",
        "run",
        "--source",
        "kafka",
        "--input-topic",
        topic,
        "--bootstrap-servers",
        bootstrap,
        "--kafka-group-id",
        f"fresh-{topic}",
        "--output",
        str(work / "stream"),
        "--store",
        store_url,
        "--node-registry",
        str(registry),
        "--flush-every",
        "5s",
        "--emit-every",
        args.emit_every,
        "--kafka-watermark-delay",
        args.watermark_delay,
        "--wait",
        *beam,
    ]
    log = open(work / "run.log", "w")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, log


def stop_job(process: subprocess.Popen) -> None:
    """The launcher and what it started (Prism, the Flink job server) share a process group:
    stop it by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runner", choices=("flink", "prism"), default="flink", help="where `run` runs"
    )
    parser.add_argument("--parallelism", type=int, default=2, help="Flink parallelism")
    parser.add_argument("--job-server-jar", help="Flink job-server jar (default: env/profile)")
    parser.add_argument("--rate", type=float, default=50.0, help="packets/s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of publishing")
    parser.add_argument("--problems", type=int, default=8, help="addresses")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument(
        "--partitions",
        type=int,
        default=8,
        help="topic partitions (some stay empty with few addresses: the reader's idle advance "
        "must keep the watermark moving)",
    )
    parser.add_argument("--emit-every", default="5s", help="qis-beam run --emit-every")
    parser.add_argument(
        "--watermark-delay",
        default="1m",
        help="qis-beam run --kafka-watermark-delay (its default 1m): all-time snapshots are "
        "event-time timers, so a packet is counted once the watermark passes it + emit-every",
    )
    parser.add_argument("--poll", type=float, default=0.1, help="GetSynthesis period, s")
    parser.add_argument("--drain", type=float, default=120.0, help="max wait after publishing")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (run.log)")
    parser.add_argument("--startup", type=float, default=300.0, help="max wait for the job")
    args = parser.parse_args()

    from qis_beam import stack
    from qis_beam.service.server import ServeConfig, start_server
    from qis_beam.stack.kafka import create_topic
    from qis_beam.store import open_store
    from qis_beam.transports import open_transport

    work = Path(tempfile.mkdtemp(prefix="qis-fresh-"))
    state = work / "stack"
    pieces = ["kafka", "postgres"] + (["flink"] if args.runner == "flink" else [])
    job = log = running = store = flink_rest = None
    load_before = os.getloadavg()[0]
    t_start = time.monotonic()
    try:
        started = stack.up(state, only=pieces, tie_to_caller=True)
        if args.runner == "flink":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_flink import FlinkRest

            flink_rest = FlinkRest(started["flink"].piece.endpoints["rest"])
        beam = runner_args(
            args, started["flink"].piece.endpoints["flink_master"] if flink_rest else None
        )
        bootstrap = started["kafka"].piece.endpoints["bootstrap"]
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from pg_local import fresh_database

        store_url = fresh_database(started["postgres"].piece.endpoints["url"])
        topic = f"fresh-{secrets.token_hex(4)}"
        create_topic(bootstrap, topic, partitions=args.partitions)
        registry = work / "nodes.txt"
        packets = Packets(args.problems + 1, args.nodes, registry)  # the last one: warm-up
        job, log = start_job(args, bootstrap, topic, store_url, work, registry, beam)
        store = open_store(store_url)
        running = start_server(store, ServeConfig(port=0))
        target = f"127.0.0.1:{running.port}"
        hexes = [a.hex() for a in packets.addresses]
        poller = Poller(target, hexes, args.poll)
        poller.start()

        with open_transport(f"kafka://{bootstrap}/{topic}") as transport:
            # Warm-up: one packet every second to a separate address until it is served, so
            # the job's start (Prism, the SDK harness, the reader's first assignment) is not
            # counted as delay.
            t0 = time.monotonic()
            warm = len(hexes) - 1
            while poller.count(hexes[warm]) == 0:
                if job.poll() is not None or time.monotonic() - t0 > args.startup:
                    raise RuntimeError(f"the job did not start: see {work / 'run.log'}")
                record, event_ms = packets.next(warm)
                transport.publish(record, event_time_ms=event_ms, key=packets.addresses[warm])
                transport.flush()
                time.sleep(1.0)
            print(f"job serving after {time.monotonic() - t0:.0f}s (warm-up)", flush=True)

            published: dict[str, list[float]] = {a: [] for a in hexes[:warm]}
            begin = time.monotonic()
            sent = 0
            while True:
                due = begin + sent / args.rate
                now = time.monotonic()
                if due - begin >= args.duration:
                    break
                if due > now:
                    time.sleep(due - now)
                problem = sent % warm
                record, event_ms = packets.next(problem)
                published[hexes[problem]].append(time.time())
                transport.publish(record, event_time_ms=event_ms, key=packets.addresses[problem])
                sent += 1
            transport.flush()
            publish_s = time.monotonic() - begin
        del transport  # the producer closes now, not after the broker is gone

        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline and any(
            poller.count(a) < len(published[a]) for a in published
        ):
            time.sleep(0.5)
        poller.stop.set()
        poller.join()

        found = delays(published, poller.seen)
        counted = sum(poller.count(a) for a in published)
        # Sustained end to end: packets counted per second from the first publish to the
        # moment the last one was counted (the store's counts themselves grow in bursts).
        first_sent = min(t for times in published.values() for t in times)
        last_counted = max((seen[-1][1] for seen in poller.seen.values() if seen), default=None)
        result = {
            "runner": args.runner,
            "load1_before": round(load_before, 2),
            "load1_after": round(os.getloadavg()[0], 2),
            "whole_run_s": round(time.monotonic() - t_start, 1),
            "rate_target": args.rate,
            "published": sent,
            "publish_rate": sent / publish_s,
            "counted": counted,
            "end_to_end_rate": counted / (last_counted - first_sent) if last_counted else None,
            "partitions": args.partitions,
            "emit_every": args.emit_every,
            "watermark_delay": args.watermark_delay,
            "polls": poller.polls,
            "p50_s": _percentile(found, 0.5) if found else None,
            "p99_s": _percentile(found, 0.99) if found else None,
            "max_s": max(found) if found else None,
        }
        print(
            f"published {sent} packets at {result['publish_rate']:.1f}/s "
            f"(target {args.rate:g}/s); counted {counted}"
            + (
                f" ({result['end_to_end_rate']:.1f}/s from first publish to last count)"
                if result["end_to_end_rate"]
                else ""
            )
        )
        if found:
            print(
                f"publish -> GetSynthesis counts it (--emit-every {args.emit_every}, "
                f"--kafka-watermark-delay {args.watermark_delay}): "
                f"p50 {result['p50_s']:.2f} s  p99 {result['p99_s']:.2f} s  "
                f"max {result['max_s']:.2f} s"
            )
        print(
            f"runner {args.runner}; load {result['load1_before']:.1f} -> "
            f"{result['load1_after']:.1f}; whole run {result['whole_run_s']:.0f}s"
        )
        print(json.dumps(result))
    finally:
        if running is not None:
            running.stop(grace=None)
        if store is not None:
            store.close()
        if job is not None:
            stop_job(job)
            log.close()
        if flink_rest is not None:  # the job outlives its launcher on a session cluster
            flink_rest.cancel_running(set())
        stack.down(state, purge=True)
        if args.keep:
            print(f"kept {work} (run.log, stream outputs)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
