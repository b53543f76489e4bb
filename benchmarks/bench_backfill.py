"""Backfill speed and memory, each against references measured in the same run.

    python benchmarks/bench_backfill.py      # 1M packets, 1000 addresses, zipf 1.1
    python benchmarks/bench_backfill.py --packets 200000 --skip-signed --memory-sizes ''
    python benchmarks/bench_backfill.py --skip-signed --memory-sizes 1000000,4000000

Prints, for unsigned logs (the targets of issue 9):
  * a tight single-process loop over the same shards: read TFRecord, parse, skip repeated
    packet_ids with a set, and per (address, all time) and (address, hour) accumulate count,
    sum w, sum w*delta, sum w*delta^2, an exact node set and per-approach sums (no validation);
  * an idiomatic Beam pipeline for the same job on the FnApiRunner, in a fresh process:
    ReadFromTFRecord -> parse -> CombinePerKey(min) by packet_id -> key by address and hour
    (and address) -> CombinePerKey;
  * ``qis-beam backfill`` on the FnApiRunner in a fresh process, one worker and two workers
    (``--direct_num_workers 2 --direct_running_mode multi_processing``);
  * records/s of each (whole-process wall time for the Beam ones), the ratios the targets are
    stated in (backfill >= 0.5x the tight loop, >= 1.5x the idiomatic pipeline), and the peak
    RSS of each Beam process *tree* (sampled from /proc, workers included);
  * with ``--memory-sizes A,B``: the backfill's peak tree RSS at two sizes (target: <= 1 GiB at
    1M packets and at most 1.5x that at 4M).
For signed logs: the backfill against a loop that only parses and verifies signatures.
Timings are never asserted anywhere: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from google.protobuf.message import DecodeError

from qis_beam.proto import packet_pb2
from qis_beam.sim import SwarmConfig, simulate
from qis_beam.tfrecords import iter_records, read_file

HOUR_MS = 3_600_000
GIB = 1024.0


def make_log(directory: str, packets: int, addresses: int, signed: bool, skew: float) -> str:
    if not os.path.exists(os.path.join(directory, "truth.json")):
        config = SwarmConfig(
            packets=packets,
            addresses=addresses,
            nodes=1000,
            approaches=12,
            signed=signed,
            address_skew=skew,
            shards=8,
            seed=11,
        )
        started = time.perf_counter()
        simulate(directory, config)
        print(
            f"  generated {packets} {'signed' if signed else 'unsigned'} packets in "
            f"{time.perf_counter() - started:.1f}s -> {directory}"
        )
    return os.path.join(directory, "packets-*.tfrecord")


class _Sums:
    """count, sum w, sum w*delta, sum w*delta^2, exact node set, per-approach sums."""

    __slots__ = ("n", "w", "wd", "wdd", "nodes", "approaches")

    def __init__(self):
        self.n = 0
        self.w = self.wd = self.wdd = 0.0
        self.nodes = set()
        self.approaches = {}

    def add(self, node_id, approach_id, outcome, delta, w):
        wd = w * delta
        self.n += 1
        self.w += w
        self.wd += wd
        self.wdd += wd * delta
        self.nodes.add(node_id)
        a = self.approaches.get(approach_id)
        if a is None:
            a = self.approaches[approach_id] = [0, 0.0, 0.0, 0.0]
        a[0] += 1
        a[1] += w
        a[2] += wd
        a[3] += w * (outcome == 1)

    def merge(self, other):
        self.n += other.n
        self.w += other.w
        self.wd += other.wd
        self.wdd += other.wdd
        self.nodes |= other.nodes
        for aid, (n, w, wd, ws) in other.approaches.items():
            a = self.approaches.setdefault(aid, [0, 0.0, 0.0, 0.0])
            a[0] += n
            a[1] += w
            a[2] += wd
            a[3] += ws
        return self


def tight_loop(pattern: str) -> int:
    """The issue's reference: one process, no Beam, no validation; returns records read."""
    records = 0
    seen = set()
    groups: dict = {}
    envelope, packet = packet_pb2.Envelope(), packet_pb2.OutcomePacket()
    for path in sorted(glob.glob(pattern)):
        for record in iter_records(read_file(path)):
            records += 1
            try:
                envelope.ParseFromString(record)
                packet.ParseFromString(envelope.payload)
            except DecodeError:
                continue
            packet_id = packet.packet_id
            if packet_id in seen:
                continue
            seen.add(packet_id)
            address = packet.semantic_address
            t = packet.event_time_ms
            args = (
                packet.node_id,
                packet.approach_id,
                packet.outcome_type,
                packet.outcome_delta,
                packet.confidence,
            )
            for key in (address, (address, t - t % HOUR_MS)):
                sums = groups.get(key)
                if sums is None:
                    sums = groups[key] = _Sums()
                sums.add(*args)
    return records


def verify_loop(pattern: str) -> int:
    """Parse and verify every signature, nothing else (the signed target's reference)."""
    from qis_beam.signing import verify

    records = 0
    for path in sorted(glob.glob(pattern)):
        for record in iter_records(read_file(path)):
            records += 1
            try:  # the simulated log holds malformed records too
                envelope = packet_pb2.Envelope.FromString(record)
                packet_pb2.OutcomePacket.FromString(envelope.payload)
            except DecodeError:
                continue
            verify(envelope.public_key, envelope.signature, envelope.payload)
    return records


# The idiomatic pipeline, run as ``python -c`` in a fresh process like the backfill.
IDIOMATIC = textwrap.dedent(
    """
    import sys
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from bench_backfill import HOUR_MS, _Sums
    from qis_beam.proto import packet_pb2

    def parse(record):
        try:
            payload = packet_pb2.Envelope.FromString(record).payload
            return [(packet_pb2.OutcomePacket.FromString(payload).packet_id, payload)]
        except Exception:
            return []

    def keyed(payload):
        p = packet_pb2.OutcomePacket.FromString(payload)
        args = (p.node_id, p.approach_id, p.outcome_type, p.outcome_delta, p.confidence)
        t = p.event_time_ms
        yield p.semantic_address.hex(), args
        yield f"{p.semantic_address.hex()}|{t - t % HOUR_MS}", args

    class SumsFn(beam.CombineFn):
        def create_accumulator(self):
            return _Sums()
        def add_input(self, acc, args):
            acc.add(*args)
            return acc
        def merge_accumulators(self, accs):
            accs = iter(accs)
            first = next(accs)
            for acc in accs:
                first.merge(acc)
            return first
        def extract_output(self, acc):
            return (acc.n, acc.w, acc.wd, acc.wdd, len(acc.nodes), len(acc.approaches))

    pattern, out = sys.argv[1:3]
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        (
            p
            | beam.io.ReadFromTFRecord(pattern)
            | beam.FlatMap(parse)
            | "MinPerPacketId" >> beam.CombinePerKey(min)
            | beam.Values()
            | beam.FlatMap(keyed)
            | "SynthesisPerKey" >> beam.CombinePerKey(SumsFn())
            | beam.io.WriteToText(out)
        )
    """
)


def load_average() -> str:
    """The machine's load (other processes distort wall times: report it with them)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def tree_rss_kib(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                pages = int(f.read().split()[1])
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB of the whole process tree, CPU seconds of the tree) of a
    fresh process. CPU time is the steadier figure on a shared machine."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss_kib(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    return wall, peak / 1024, usage.ru_utime + usage.ru_stime


def backfill(pattern: str, output: str, extra: list[str]) -> tuple[float, float, float]:
    argv = [
        *[sys.executable, "-m", "qis_beam.cli", "backfill"],
        *["--input", pattern, "--output", output, "--runner", "FnApiRunner"],
        *extra,
    ]
    return run_measured(argv)


def idiomatic(pattern: str, output: str) -> tuple[float, float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")]
    )
    os.makedirs(output, exist_ok=True)
    return run_measured(
        [sys.executable, "-c", IDIOMATIC, pattern, os.path.join(output, "part")], env
    )


TWO_WORKERS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def unsigned_speed(pattern: str, out_dir: str, workers: list[int]) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    records = tight_loop(pattern)
    loop_s, loop_cpu = time.perf_counter() - started, time.process_time() - cpu
    idiom_s, idiom_rss, idiom_cpu = idiomatic(pattern, os.path.join(out_dir, "idiomatic"))
    print(f"\n[unsigned] {records} records (wall time; CPU seconds of the process tree in [])")
    print(f"  {load_average()}")
    print(
        f"  tight loop (one process)   : {records / loop_s:9.0f} records/s "
        f"({loop_s:.1f}s [{loop_cpu:.1f}])"
    )
    print(
        f"  idiomatic Beam, FnApiRunner: {records / idiom_s:9.0f} records/s "
        f"({idiom_s:.1f}s [{idiom_cpu:.1f}], peak tree RSS {idiom_rss:.0f} MiB)"
    )
    for n in workers:
        extra = ["--allow-unsigned"] + (TWO_WORKERS if n == 2 else [])
        wall, rss, cpu_s = backfill(pattern, os.path.join(out_dir, f"out-{n}w"), extra)
        print(
            f"  backfill, {n} worker{'s' if n > 1 else ' '}      : {records / wall:9.0f} records/s "
            f"({wall:.1f}s [{cpu_s:.1f}], peak tree RSS {rss:.0f} MiB)"
        )
        print(
            f"    ratio to tight loop {loop_s / wall:.2f}x (target >= 0.5), "
            f"to idiomatic Beam {idiom_s / wall:.2f}x (target >= 1.5); "
            f"by CPU time {loop_cpu / cpu_s:.2f}x and {idiom_cpu / cpu_s:.2f}x"
        )
        print(f"    {load_average()}")


def signed_speed(pattern: str, out_dir: str) -> None:
    started = time.perf_counter()
    records = verify_loop(pattern)
    verify_s = time.perf_counter() - started
    wall, rss, _ = backfill(pattern, os.path.join(out_dir, "out"), [])
    print(f"\n[signed] {records} records")
    print(f"  parse+verify loop : {records / verify_s:9.0f} records/s ({verify_s:.1f}s)")
    print(f"  backfill, 1 worker: {records / wall:9.0f} records/s ({wall:.1f}s, {rss:.0f} MiB)")
    print(f"  ratio backfill / parse+verify loop = {verify_s / wall:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--addresses", type=int, default=1000)
    parser.add_argument("--skew", type=float, default=1.1, help="zipf exponent of address load")
    parser.add_argument("--workers", default="1,2", help="backfill worker counts to time")
    parser.add_argument(
        "--memory-sizes", default="", help="two packet counts, e.g. 1000000,4000000"
    )
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "qis-bench"))
    parser.add_argument("--skip-signed", action="store_true")
    args = parser.parse_args()
    n = args.packets
    print(
        f"qis-beam backfill benchmark: {n} packets, {args.addresses} addresses, "
        f"zipf skew {args.skew}, python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )

    def log_dir(size: int, signed: bool) -> str:
        kind = "signed" if signed else "unsigned"
        return os.path.join(args.work_dir, f"{kind}-{size}-{args.addresses}-{args.skew}")

    if n:
        d = log_dir(n, False)
        pattern = make_log(d, n, args.addresses, False, args.skew)
        unsigned_speed(pattern, d, [int(w) for w in args.workers.split(",") if w])
        if not args.skip_signed:
            d = log_dir(n, True)
            signed_speed(make_log(d, n, args.addresses, True, args.skew), d)

    if args.memory_sizes:
        small, large = (int(x) for x in args.memory_sizes.split(","))
        print("\n[memory] unsigned backfill, 1 worker, peak RSS of the whole process tree")
        peaks = []
        for size in (small, large):
            d = log_dir(size, False)
            pattern = make_log(d, size, args.addresses, False, args.skew)
            wall, rss, _ = backfill(pattern, os.path.join(d, "out-1w"), ["--allow-unsigned"])
            peaks.append(rss)
            print(
                f"  {size:>9} packets: peak tree RSS {rss:7.0f} MiB ({wall:.1f}s; {load_average()})"
            )
        print(
            f"  {large} / {small}: {peaks[1] / peaks[0]:.2f}x (target <= 1.5x; "
            f"and <= {GIB:.0f} MiB at 1M)"
        )


if __name__ == "__main__":
    main()
