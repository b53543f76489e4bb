"""``qis-beam simulate``: a swarm's packet log as TFRecord shards, with its registry and truth.

Counts. ``packets`` distinct valid packets (the pipeline's ``valid``). ``duplicate_fraction``
x packets records are re-sent copies of valid packets (:mod:`qis_beam.sim.packets`: exact
replays and conflicting resends); ``malformed_fraction`` x packets malformed records
(:mod:`qis_beam.sim.defects`) come on top. Hence
``records = valid + duplicates + conflicting + malformed`` and, validated with
``ValidationPolicy(registry=nodes.txt, allow_unsigned=not signed)`` and default limits,
``dead_letters = malformed + conflicting``. Without ``--node-registry`` the ``unknown_node``
records are valid packets; the truth counts assume the registry is given.

Log order is arrival at the collector (emit time plus a heavy-tailed delay), cut into
``shards`` files of Beam's default shard naming. ``truth.json`` says what a correct pipeline
must find: per address the true best approach, the expected run summary, and where each
malformed record is (file, index, intended reason, variant).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np

from qis_beam.sim.packets import draw_resends, draw_rows, records_in_log_order
from qis_beam.sim.swarm import Swarm, SwarmConfig, draw_swarm, write_registry, write_truth
from qis_beam.tfrecords import write_record
from qis_beam.validation import INGEST_REASONS, ValidationPolicy

PROGRESS_EVERY = 10_000
_SHARD_NAME = re.compile(r"packets-\d{5}-of-\d{5}\.tfrecord")
_POLICY_DEFAULTS = ValidationPolicy()


@dataclasses.dataclass
class SimulationReport:
    """What was written, for the CLI to print and tests to check (module docstring: counts)."""

    out_dir: str
    files: list[str]  # the shards in log order, then nodes.txt and truth.json
    records: int
    valid: int  # distinct valid packets: what the synthesis must see
    duplicates: int  # exact replays
    malformed_by_reason: dict[str, int]  # every ingestion reason, 0 where not produced
    late: int  # valid packets emitted >= 1h after their event time
    conflicting: int = 0  # resent copies with a changed payload (conflicting_duplicate)

    @property
    def malformed(self) -> int:
        return sum(self.malformed_by_reason.values())

    @property
    def shard_files(self) -> list[str]:
        return [f for f in self.files if _SHARD_NAME.fullmatch(os.path.basename(f))]

    def counts(self) -> dict:
        """The counts, and the run summary a pipeline reading the whole log must report."""
        dead_letters = dict(self.malformed_by_reason, conflicting_duplicate=self.conflicting)
        return {
            "records": self.records,
            "valid": self.valid,
            "duplicates": self.duplicates,
            "conflicting": self.conflicting,
            "malformed": self.malformed,
            "malformed_by_reason": dict(self.malformed_by_reason),
            "late": self.late,
            "expected_summary": {
                "records_in": self.records,
                "valid": self.valid,
                "duplicates": self.duplicates,
                "dead_letters": {
                    "total": sum(dead_letters.values()),
                    "by_reason": {r: n for r, n in dead_letters.items() if n},
                },
            },
        }

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "files": list(self.files),
            "input_glob": os.path.join(self.out_dir, "packets-*.tfrecord"),
            **self.counts(),
        }


def shard_name(index: int, shards: int) -> str:
    """Beam's default shard naming: ``packets-00000-of-00004.tfrecord``."""
    return f"packets-{index:05d}-of-{shards:05d}.tfrecord"


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
    """Shards of an earlier run with another shard count would join the input glob."""
    for name in os.listdir(out_dir):
        if _SHARD_NAME.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def simulate(
    out_dir: str,
    config: SwarmConfig,
    progress: Callable[[int, int], None] | None = None,
) -> SimulationReport:
    """Write a synthetic swarm's packet log, node registry and truth to ``out_dir``.

    ``progress(done, total)`` is called every ``PROGRESS_EVERY`` records and at the end.
    Stale ``packets-*-of-*.tfrecord`` shards in ``out_dir`` are removed.
    """
    rng = np.random.Generator(np.random.PCG64(config.seed))
    swarm = draw_swarm(rng, config)
    total_rows = config.packets + round(config.malformed_fraction * config.packets)
    rows = draw_rows(rng, config, swarm, total_rows)
    valid_rows = np.setdiff1d(np.arange(total_rows), rows.malformed)
    resends = draw_resends(rng, config, swarm, rows, valid_rows)

    # Log order: by arrival at the collector (emit time plus a heavy-tailed delay).
    conflict_arrival = rows.arrival[resends.conflict_sources] + resends.resend_after
    arrival = np.concatenate([rows.arrival, resends.exact_arrival, conflict_arrival])
    order = np.lexsort((np.arange(arrival.size), arrival))
    n_records = int(order.size)
    records = records_in_log_order(config, swarm, rows, resends, order)

    os.makedirs(out_dir, exist_ok=True)
    shard_names = [shard_name(s, config.shards) for s in range(config.shards)]
    _remove_stale_shards(out_dir, set(shard_names))
    bounds = [s * n_records // config.shards for s in range(config.shards + 1)]
    malformed_by_reason = dict.fromkeys(INGEST_REASONS, 0)
    malformed_truth = []
    done = 0
    for s, name in enumerate(shard_names):
        with open(os.path.join(out_dir, name), "wb") as handle:
            for index in range(bounds[s + 1] - bounds[s]):
                record, malformation = next(records)
                write_record(handle, record)
                if malformation is not None:
                    malformed_by_reason[malformation["reason"]] += 1
                    malformed_truth.append({"file": name, "index": index, **malformation})
                done += 1
                if progress is not None and done % PROGRESS_EVERY == 0 and done < n_records:
                    progress(done, n_records)

    registry = os.path.join(out_dir, "nodes.txt")
    write_registry(registry, swarm.keys, f"simulated swarm, seed {config.seed}")

    truth_path = os.path.join(out_dir, "truth.json")
    report = SimulationReport(
        out_dir=out_dir,
        files=[*(os.path.join(out_dir, n) for n in shard_names), registry, truth_path],
        records=n_records,
        valid=config.packets,
        duplicates=int(resends.exact_sources.size),
        malformed_by_reason=malformed_by_reason,
        late=int(rows.late.size),
        conflicting=int(resends.conflict_sources.size),
    )
    write_truth(truth_path, _truth(config, swarm, rows, valid_rows, report, malformed_truth))
    if progress is not None:
        progress(n_records, n_records)
    return report


def _truth(config, swarm: Swarm, rows, valid_rows, report, malformed_truth) -> dict:
    valid_address = rows.address[valid_rows]
    n_packets = np.bincount(valid_address, minlength=config.addresses)
    pairs = np.unique(valid_address * config.nodes + rows.node[valid_rows])
    n_nodes = np.bincount(pairs // config.nodes, minlength=config.addresses)
    return {
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "addresses": swarm.address_truth(n_packets, n_nodes),
        "counts": report.counts(),
        "malformed": malformed_truth,
        "unregistered_public_keys": [k.public_key.hex() for k in swarm.unregistered],
        "validation_policy": {
            "registry": "nodes.txt",
            "allow_unsigned": not config.signed,
            "max_packet_bytes": _POLICY_DEFAULTS.max_packet_bytes,
            "max_clock_skew_ms": _POLICY_DEFAULTS.max_clock_skew_ms,
        },
    }
