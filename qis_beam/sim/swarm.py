"""The swarm: its configuration, its nodes and problems, and the hidden truth.

A :class:`Swarm` is drawn once per seed (node keys, noise and confidence habits, the
problems each node works on, every approach's true effect); the file simulator and the
live sender both play the same swarm, so one seed means the same nodes and the same truth.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np

from qis_beam.address import semantic_address
from qis_beam.signing import NodeKey
from qis_beam.sim.defects import reasons_for
from qis_beam.sim.templates import CATALOGUES, MAX_ADDRESSES, MAX_APPROACHES, SPECS, TEMPLATE_IDS
from qis_beam.wire import HOUR_MS

# Hidden truth: effects ~ N(0, EFFECT_SD); the best approach leads the runner-up by BEST_MARGIN.
EFFECT_SD = 0.02
BEST_MARGIN = 0.015
# Nodes: typical noise of one measurement (see qis_beam.sim.packets).
NOISE_MEDIAN = 0.02
UNREGISTERED_NODES = 3


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
    """What to simulate; one config with one seed gives byte-identical files."""

    nodes: int = 200
    addresses: int = 20
    approaches: int = 12
    packets: int = 100_000
    seed: int = 0
    duplicate_fraction: float = 0.01
    malformed_fraction: float = 0.005
    late_fraction: float = 0.02  # edge nodes that reconnect hours late (emit hours after event)
    shards: int = 4  # number of packets-*.tfrecord files
    # False: unsigned envelopes (public_key set, empty signature) for --allow-unsigned runs.
    signed: bool = True
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed, so a seed fixes the output
    span_ms: int = 24 * HOUR_MS  # event times spread over [start_ms, start_ms + span_ms)
    address_skew: float = 0.0  # 0: uniform packets per address; >0: zipf exponent (hot keys)

    def __post_init__(self):
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(self.nodes >= 1, f"nodes must be >= 1, got {self.nodes}")
        require(
            1 <= self.addresses <= MAX_ADDRESSES,
            f"addresses must be in [1, {MAX_ADDRESSES}], got {self.addresses}",
        )
        require(
            2 <= self.approaches <= MAX_APPROACHES,
            f"approaches must be in [2, {MAX_APPROACHES}], got {self.approaches}",
        )
        require(self.packets >= 0, f"packets must be >= 0, got {self.packets}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        for name in ("duplicate_fraction", "malformed_fraction", "late_fraction"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        require(self.shards >= 1, f"shards must be >= 1, got {self.shards}")
        require(self.start_ms > 0, f"start_ms must be > 0, got {self.start_ms}")
        require(self.span_ms >= 1, f"span_ms must be >= 1, got {self.span_ms}")
        require(
            math.isfinite(self.address_skew) and self.address_skew >= 0,
            f"address_skew must be >= 0, got {self.address_skew}",
        )

    def reasons(self) -> tuple[str, ...]:
        """The ingestion reasons this swarm's malformed records cover, in check order."""
        return reasons_for(self.signed)


@dataclasses.dataclass
class Swarm:
    """Nodes, problems and the hidden truth."""

    keys: list[NodeKey]
    unregistered: list[NodeKey]
    noise_sd: np.ndarray  # per node
    bias: np.ndarray  # per node: a slightly miscalibrated evaluation
    habit: np.ndarray  # per node: how confident it tends to say it is, in (0, 1]
    sample_scale: np.ndarray  # per node: typical evaluation size
    speed: np.ndarray  # per node: hardware throughput factor
    template_ids: list[str]  # per address
    contexts: list[dict]
    addresses: list[bytes]
    approaches: list[tuple[str, ...]]
    effects: np.ndarray  # (addresses, approaches)
    baseline: np.ndarray  # per address: primary metric before any approach
    popularity: np.ndarray  # per address: share of packets
    node_sets: list[np.ndarray]  # per address: the nodes working on it
    activity: np.ndarray  # per node: relative packet rate

    def address_truth(self, n_packets: Sequence[int], n_nodes: Sequence[int]) -> dict:
        """truth.json's ``addresses``: per hex address its problem, true effects and best
        approach, with the valid packets and distinct nodes that were sent for it."""
        addresses = {}
        for a, address in enumerate(self.addresses):
            effects = dict(zip(self.approaches[a], self.effects[a].tolist(), strict=True))
            addresses[address.hex()] = {
                "template_id": self.template_ids[a],
                "context": self.contexts[a],
                "best_approach": self.approaches[a][int(np.argmax(self.effects[a]))],
                "effects": effects,
                "n_packets": int(n_packets[a]),
                "n_nodes": int(n_nodes[a]),
            }
        return addresses


def _draw_problems(rng: np.random.Generator, config: SwarmConfig):
    template_ids, contexts, addresses, seen = [], [], [], set()
    attempts = 0
    while len(addresses) < config.addresses:
        attempts += 1
        if attempts > 100 * config.addresses + 1000:
            raise ValueError(
                f"cannot find {config.addresses} distinct problem contexts; use fewer addresses"
            )
        template_id = TEMPLATE_IDS[len(addresses) % len(TEMPLATE_IDS)]
        choices = SPECS[template_id].context_choices
        context = {k: v[int(rng.integers(len(v)))] for k, v in choices.items()}
        address = semantic_address(template_id, context)
        if address in seen:  # two contexts in the same numeric bins are one problem
            continue
        seen.add(address)
        template_ids.append(template_id)
        contexts.append(context)
        addresses.append(address)
    return template_ids, contexts, addresses


def draw_swarm(rng: np.random.Generator, config: SwarmConfig) -> Swarm:
    """The swarm of ``config`` from ``rng``: the draws' order is part of every seed's output."""
    n, a, k = config.nodes, config.addresses, config.approaches
    keys = [NodeKey.from_seed(rng.bytes(32)) for _ in range(n)]
    unregistered = [NodeKey.from_seed(rng.bytes(32)) for _ in range(UNREGISTERED_NODES)]
    # Most nodes are near the median noise; a few are very precise or very noisy.
    noise_sd = NOISE_MEDIAN * rng.lognormal(0.0, 0.6, n)
    bias = rng.normal(0.0, 0.002, n)
    habit = rng.beta(8.0, 2.0, n)
    sample_scale = np.exp(rng.normal(math.log(400.0), 1.0, n))
    speed = rng.lognormal(0.0, 0.4, n)
    activity = rng.lognormal(0.0, 0.7, n)

    template_ids, contexts, addresses = _draw_problems(rng, config)
    approaches = [CATALOGUES[t][:k] for t in template_ids]
    effects = np.round(rng.normal(0.0, EFFECT_SD, (a, k)), 6)
    for row in effects:
        best, second = np.argsort(-row, kind="stable")[:2]
        row[best] = max(row[best], round(row[second] + BEST_MARGIN, 6))
    baseline = np.array([rng.uniform(*SPECS[t].baseline) for t in template_ids])

    rank = rng.permutation(a)  # hot addresses are not simply the first ones
    popularity = (rank + 1.0) ** -config.address_skew
    popularity /= popularity.sum()

    # Each node works on a few problems, popular ones more often; every problem has nodes.
    members: list[set[int]] = [set() for _ in range(a)]
    for node in range(n):
        count = min(a, 1 + int(rng.poisson(1.0)))
        for address in rng.choice(a, size=count, replace=False, p=popularity):
            members[int(address)].add(node)
    for address in range(a):
        want = min(n, 3) - len(members[address])
        if want > 0:
            others = np.setdiff1d(np.arange(n), sorted(members[address]))
            members[address].update(int(x) for x in rng.choice(others, want, replace=False))
    node_sets = [np.array(sorted(m)) for m in members]
    return Swarm(
        keys, unregistered, noise_sd, bias, habit, sample_scale, speed, template_ids, contexts,
        addresses, approaches, effects, baseline, popularity, node_sets, activity,
    )  # fmt: skip


def write_registry(path: str, keys: Sequence[NodeKey], about: str) -> None:
    """``nodes.txt``: the swarm's public keys, the registry for ``--node-registry``."""
    with open(path, "w", encoding="ascii") as f:
        f.write(
            f"# qis-beam node registry: {len(keys)} Ed25519 public keys (hex), one per line\n"
            f"# {about}\n"
        )
        f.writelines(key.public_key.hex() + "\n" for key in keys)


def write_truth(path: str, truth: dict) -> None:
    """``truth.json``: stable key order, so a seed gives the same bytes."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
        f.write("\n")
