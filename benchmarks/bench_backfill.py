"""Backfill speed and memory, each against a reference measured in the same run.

    python benchmarks/bench_backfill.py                 # 1M packets, ~1000 addresses, zipf skew
    python benchmarks/bench_backfill.py --packets 200000 --memory-sizes 200000,800000

Prints, for unsigned and signed logs:
  * a reference tight loop over the same records with the same modules (validate, batch
    dedupe rule, per-packet ``Synthesis.add`` per (address, window) and per address);
  * ``qis-beam backfill`` on the FnApiRunner, in a fresh process (whole-process time);
  * for signed logs, a loop that only parses and verifies signatures;
  * records/s and the ratios the targets are stated in;
  * hot-key fanout on the skewed addresses; peak memory (max RSS) of backfill at two sizes.
Timings are never asserted anywhere: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

from qis_beam.dedupe import dedupe
from qis_beam.partials import parse_payload
from qis_beam.simulate import SwarmConfig, simulate
from qis_beam.synthesis import Synthesis
from qis_beam.tfrecords import iter_records, read_file
from qis_beam.transforms.ingest import payload_of
from qis_beam.validation import Accepted, ValidationPolicy, validate

HOUR_MS = 3_600_000


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


def reference_loop(pattern: str, policy: ValidationPolicy, window_ms: int) -> int:
    """The same synthesis in plain Python, one packet at a time; returns records read."""
    records = 0
    copies = []
    for path in sorted(glob.glob(pattern)):
        for record in iter_records(read_file(path)):
            records += 1
            verdict = validate(record, policy, policy.now_ms)
            if isinstance(verdict, Accepted):
                copies.append((verdict.packet.packet_id, record, path))
    kept = dedupe(copies, payload_of).kept
    windows: dict[tuple[str, int], Synthesis] = {}
    all_time: dict[str, Synthesis] = {}
    for record in kept.values():
        p = parse_payload(payload_of(record))
        address = p.semantic_address.hex()
        args = (
            p.node_id,
            p.approach_id,
            p.outcome_type,
            p.outcome_delta,
            p.confidence,
            p.event_time_ms,
            p.template_id,
        )
        key = (address, p.event_time_ms - p.event_time_ms % window_ms)
        (windows.get(key) or windows.setdefault(key, Synthesis())).add(*args)
        (all_time.get(address) or all_time.setdefault(address, Synthesis())).add(*args)
    for synthesis in (*windows.values(), *all_time.values()):
        synthesis.extract()
    return records


def verify_loop(pattern: str) -> int:
    """Parse and verify every signature, nothing else (the signed target's reference)."""
    from google.protobuf.message import DecodeError

    from qis_beam.proto import packet_pb2
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


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def backfill_process(pattern: str, output: str, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``qis-beam backfill`` in a fresh process."""
    code = (
        "import resource, sys; from qis_beam.cli import main; rc = main(sys.argv[1:]); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        "backfill",
        "--input",
        pattern,
        "--output",
        output,
        "--runner",
        "FnApiRunner",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    rss_kib = int(
        next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("MAXRSS"))
    )
    return wall, rss_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--addresses", type=int, default=1000)
    parser.add_argument("--skew", type=float, default=1.1, help="zipf exponent of address load")
    parser.add_argument(
        "--memory-sizes", default="", help="two packet counts, e.g. 1000000,4000000"
    )
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "qis-bench"))
    parser.add_argument("--skip-signed", action="store_true")
    args = parser.parse_args()
    n = args.packets
    now_ms = int(time.time() * 1000)
    print(
        f"qis-beam backfill benchmark: {n} packets, {args.addresses} addresses, "
        f"zipf skew {args.skew}, python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )

    rows = []
    for signed in [False] if args.skip_signed else [False, True]:
        kind = "signed" if signed else "unsigned"
        log_dir = os.path.join(args.work_dir, f"{kind}-{n}-{args.addresses}-{args.skew}")
        pattern = make_log(log_dir, n, args.addresses, signed, args.skew)
        policy = ValidationPolicy(allow_unsigned=not signed, now_ms=now_ms)
        ref_s, records = timed(reference_loop, pattern, policy, HOUR_MS)
        beam_flags = [] if signed else ["--allow-unsigned"]
        beam_s, rss = backfill_process(pattern, os.path.join(log_dir, "out"), beam_flags)
        rows.append((kind, "reference loop (validate+dedupe+synthesis)", records / ref_s, ref_s))
        rows.append((kind, "backfill, FnApiRunner (whole process)", records / beam_s, beam_s))
        print(f"\n[{kind}] {records} records")
        print(f"  reference tight loop : {records / ref_s:10.0f} records/s ({ref_s:.1f}s)")
        print(
            f"  backfill FnApiRunner : {records / beam_s:10.0f} records/s ({beam_s:.1f}s, "
            f"peak RSS {rss:.0f} MiB)"
        )
        target = "" if signed else "  (target >= 0.5)"
        print(f"  ratio backfill / reference = {ref_s / beam_s:.2f}x{target}")
        if signed:
            verify_s, _ = timed(verify_loop, pattern)
            print(
                f"  parse+verify loop    : {records / verify_s:10.0f} records/s ({verify_s:.1f}s)"
            )
            print(
                f"  ratio backfill / parse+verify loop = {verify_s / beam_s:.2f}x  (target >= 0.8)"
            )
        else:
            fan_s, _ = backfill_process(
                pattern, os.path.join(log_dir, "out-fanout"), beam_flags + ["--hot-key-fanout", "8"]
            )
            print(
                f"  hot-key fanout 8     : {records / fan_s:10.0f} records/s ({fan_s:.1f}s, "
                f"{beam_s / fan_s:.2f}x of no fanout) on zipf-skewed addresses"
            )

    if args.memory_sizes:
        small, large = (int(x) for x in args.memory_sizes.split(","))
        print("\n[memory] unsigned backfill, same addresses, peak RSS of the whole process")
        peaks = []
        for size in (small, large):
            log_dir = os.path.join(args.work_dir, f"unsigned-{size}-{args.addresses}-{args.skew}")
            pattern = make_log(log_dir, size, args.addresses, False, args.skew)
            wall, rss = backfill_process(
                pattern, os.path.join(log_dir, "out"), ["--allow-unsigned"]
            )
            peaks.append(rss)
            print(f"  {size:>9} packets: peak RSS {rss:7.0f} MiB ({wall:.1f}s)")
        print(
            f"  growth {small} -> {large}: {100 * (peaks[1] / peaks[0] - 1):+.1f}% (target <= +10%)"
        )


if __name__ == "__main__":
    main()
