"""How often the all-time synthesis recommends the true best approach, by swarm size.

    python benchmarks/accuracy_by_nodes.py                      # 5..400 nodes, 3 seeds
    python benchmarks/accuracy_by_nodes.py --nodes 10,100 --packets-per-node 20

Each swarm is simulated (every node contributes the same number of packets, so more nodes
means more evidence per address), backfilled on the FnApiRunner with the CLI's defaults, and
each address's ``recommended_approach`` in the store is compared with ``truth.json``'s best
approach. Prints, per swarm size, the addresses with a recommendation and the share of those
that match, and draws the curve as a PNG (``--png``, default in the work dir). A measurement,
not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from qis_beam.jobs import STORE_NAME, pipeline_options, run_job
from qis_beam.pipelines.backfill import build_backfill
from qis_beam.settings import Settings
from qis_beam.sim import SwarmConfig, simulate
from qis_beam.sim.demo import recommendation_accuracy
from qis_beam.store import IntelligenceStore
from qis_beam.validation import ValidationPolicy


def accuracy(work_dir: str, nodes: int, packets: int, addresses: int, seed: int) -> tuple[int, int]:
    """(matching recommendations, addresses with a recommendation) for one simulated swarm."""
    swarm = os.path.join(work_dir, f"swarm-{nodes}-{packets}-{addresses}-{seed}")
    out = swarm + "-out"
    config = SwarmConfig(nodes=nodes, packets=packets, addresses=addresses, seed=seed, signed=False)
    simulate(swarm, config)
    settings = Settings(
        validation=ValidationPolicy(allow_unsigned=True, now_ms=int(time.time() * 1000))
    )
    pattern = os.path.join(swarm, "packets-*.tfrecord")
    run_job(
        lambda p: build_backfill(p, pattern, out, settings),
        out,
        pipeline_options([], default_runner="FnApiRunner"),
    )
    with open(os.path.join(swarm, "truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    with IntelligenceStore(os.path.join(out, STORE_NAME)) as store:
        return recommendation_accuracy(store, truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="5,10,25,50,100,200,400")
    parser.add_argument("--packets-per-node", type=int, default=25)
    parser.add_argument("--addresses", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--png", default=None, help="the curve (default WORK_DIR/accuracy.png)")
    args = parser.parse_args()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="qis-accuracy-")
    print(
        f"recommendation accuracy: {args.addresses} addresses, 12 approaches, "
        f"{args.packets_per_node} packets per node, {args.seeds} seeds per size"
    )
    print(f"{'nodes':>6} {'packets':>8} {'recommended':>12} {'match truth':>12}")
    points = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        packets = nodes * args.packets_per_node
        hits = total = 0
        for seed in range(args.seeds):
            h, t = accuracy(work_dir, nodes, packets, args.addresses, seed)
            hits, total = hits + h, total + t
        share = f"{100 * hits / total:.0f}%" if total else "n/a"
        print(f"{nodes:>6} {packets:>8} {total:>12} {share:>12}  ({hits}/{total})")
        points.append((nodes, hits, total))

    from qis_beam.report.figures import accuracy_figure

    png = args.png or os.path.join(work_dir, "accuracy.png")
    subtitle = (
        f"{args.addresses} addresses, {args.packets_per_node} packets per node, "
        f"{args.seeds} seeds per size"
    )
    print(f"curve: {accuracy_figure(png, points, subtitle)}")


if __name__ == "__main__":
    main()
