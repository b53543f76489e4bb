"""The main job on its embedded default: simulate a swarm, backfill it, query it.

What the README's first command runs. It shows the whole loop on one machine: nodes emit
signed packets, the pipeline routes and synthesises them by address, and a node queries
the synthesis for its own problem, whose recommendation is printed next to the hidden truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from qis_beam.jobs import STORE_NAME, pipeline_options, run_job
from qis_beam.pipelines.backfill import build_backfill
from qis_beam.settings import Settings
from qis_beam.signing import load_registry
from qis_beam.sim import SwarmConfig, simulate
from qis_beam.store import IntelligenceStore
from qis_beam.validation import ValidationPolicy


def recommendation_accuracy(store: IntelligenceStore, truth: dict) -> tuple[int, int]:
    """(addresses whose recommended approach is the true best, addresses with a recommendation)."""
    hits = total = 0
    for address, facts in truth["addresses"].items():
        latest = store.latest(address)
        if latest and latest.get("recommended_approach"):
            total += 1
            hits += latest["recommended_approach"] == facts["best_approach"]
    return hits, total


def run_demo(out_dir: str, *, packets: int, seed: int, beam_args: Sequence[str] = ()) -> int:
    swarm_dir = os.path.join(out_dir, "swarm")
    output_dir = os.path.join(out_dir, "backfill")
    print(f"[1/3] simulating a swarm of {packets} packets into {swarm_dir}")
    report = simulate(swarm_dir, SwarmConfig(packets=packets, seed=seed))
    print(
        f"      {report.records} records, {report.duplicates} duplicates, "
        f"{sum(report.malformed_by_reason.values())} malformed"
    )

    print(f"[2/3] backfilling {swarm_dir}/packets-*.tfrecord into {output_dir}")
    import time

    registry = load_registry(os.path.join(swarm_dir, "nodes.txt"))
    settings = Settings(
        validation=ValidationPolicy(registry=registry, now_ms=int(time.time() * 1000))
    )
    pattern = os.path.join(swarm_dir, "packets-*.tfrecord")
    summary = run_job(
        lambda p: build_backfill(p, pattern, output_dir, settings),
        output_dir,
        pipeline_options(beam_args, default_runner="FnApiRunner"),
    )
    dead = summary["dead_letters"]
    print(
        f"      records_in={summary['records_in']} valid={summary['valid']} "
        f"duplicates={summary['duplicates']} dead_letters={dead['total']} "
        f"balanced={summary['balanced']} in {summary['wall_time_s']:.1f}s"
    )
    for name, path in summary["outputs"].items():
        print(f"      {name}: {path}")

    with open(os.path.join(swarm_dir, "truth.json"), encoding="utf-8") as f:
        truth = json.load(f)
    address, facts = next(iter(sorted(truth["addresses"].items())))
    store_path = os.path.join(output_dir, STORE_NAME)
    context_args = " ".join(f"{k}={v}" for k, v in facts["context"].items())
    print(
        f"[3/3] qis-beam query --store {store_path} --template {facts['template_id']} "
        f"--context {context_args}"
    )
    with IntelligenceStore(store_path) as store:
        latest = store.latest(address)
        hits, total = recommendation_accuracy(store, truth)
    best = (latest or {}).get("approaches", [{}])[:1]
    print(f"      address {address}")
    print(
        f"      recommended: {(latest or {}).get('recommended_approach')}  "
        f"(true best: {facts['best_approach']})"
    )
    if best and best[0]:
        b = best[0]
        print(
            f"      success_mean={b['success_mean']:.3f} mean_delta={b['mean_delta']:.4f} "
            f"n_packets={b['n_packets']} n_nodes={b['n_nodes']}"
        )
    print(f"      recommendations matching the truth: {hits}/{total} addresses")

    from qis_beam.report import write_report  # matplotlib loads only when a report is drawn

    page = write_report(output_dir, truth_path=os.path.join(swarm_dir, "truth.json"))
    print(f"report: {os.path.abspath(page)}")
    return 0
