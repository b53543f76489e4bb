"""Synthetic swarms for ``qis-beam simulate``: believable packet logs with a known truth.

The simulator plays a whole swarm: nodes with their own Ed25519 keys, noise and confidence
habits work on a few problems each, try approaches, measure a noisy delta around a hidden
true effect and emit packets built and sealed by the real emitter
(:func:`qis_beam.emitter.build_packet` / :func:`~qis_beam.emitter.seal`), addressed with the
real :func:`~qis_beam.address.semantic_address`. The log then carries what production logs
carry: arrival order only roughly by emit time, edge nodes that reconnect hours late, replayed
copies, resent packets that changed, and malformed records covering every ingestion reason of
:mod:`qis_beam.validation`. ``truth.json`` says what a correct pipeline must find.

Decisions:

* Everything random comes from one ``numpy.random.Generator(PCG64(seed))`` (node key seeds and
  packet ids included) and Ed25519 signatures are deterministic, so one seed gives
  byte-identical files. All per-packet numbers are drawn vectorised up front, including the
  arrival time that fixes the write order, so records are built in write order and streamed
  to the shards: memory holds only the few records that are later replayed.
* Counts. ``packets`` distinct valid packets (the pipeline's ``valid``). ``duplicate_fraction``
  × packets records are re-sent copies of valid packets, of which 90 % are exact replays
  (``duplicates``) and 10 % conflicting resends (same packet_id, changed delta and emit time,
  correctly signed: dead letter ``conflicting_duplicate``); a packet is re-sent at most once, so
  batch (smallest payload kept) and streaming (first arrival kept) count the same.
  ``malformed_fraction`` × packets malformed records come on top. Hence
  ``records = valid + duplicates + conflicting + malformed`` and, validated with
  ``ValidationPolicy(registry=nodes.txt, allow_unsigned=not signed)`` and default limits,
  ``dead_letters = malformed + conflicting``.
* Malformed records go round-robin over the reasons in check order (``unsigned`` and
  ``bad_signature`` are skipped when ``signed=False``: an unsigned swarm is validated with
  ``--allow-unsigned``, where neither can happen). Every other cycle of the round-robin adds a
  second defect that a later check would catch, so the first failing check must win.
  ``truth.json`` lists each malformed record (file, index, intended reason, variant).
  ``unknown_node`` records are signed by keys not in ``nodes.txt``; ``future_event_time``
  records carry a clock reset to 2100, so the check holds whenever the log is read.
* Without ``--node-registry`` the ``unknown_node`` records are valid packets; the truth
  counts assume the registry is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from qis_beam.address import TEMPLATES, canonical_context, semantic_address
from qis_beam.emitter import OutcomeType, build_packet, seal
from qis_beam.proto import packet_pb2
from qis_beam.signing import NodeKey
from qis_beam.tfrecords import write_record
from qis_beam.validation import INGEST_REASONS, ValidationPolicy

HOUR_MS = 3_600_000
PROGRESS_EVERY = 10_000
# Share of re-sent copies that changed (conflicting_duplicate); the rest are exact replays.
CONFLICT_SHARE = 0.1
# Outcome type from the measured delta (positive = better) and the evaluation size.
RESOLVED_DELTA = 0.02
PARTIAL_DELTA = 0.005
MIN_SAMPLES = 30  # fewer evaluations than this: inconclusive (OPEN)
# Hidden truth: effects ~ N(0, EFFECT_SD); the best approach leads the runner-up by BEST_MARGIN.
EFFECT_SD = 0.02
BEST_MARGIN = 0.015
# Nodes: typical noise of one measurement on REFERENCE_SAMPLES evaluations.
NOISE_MEDIAN = 0.02
REFERENCE_SAMPLES = 500
CONFIDENCE_HALF_SAMPLES = 200  # a median-noise node is half confident at this many evaluations
UNREGISTERED_NODES = 3
# A node whose real-time clock was reset: 2100-01-01T00:00:00Z.
FAR_FUTURE_MS = 4_102_444_800_000
_POLICY_DEFAULTS = ValidationPolicy()
_SHARD_NAME = re.compile(r"packets-\d{5}-of-\d{5}\.tfrecord")


@dataclasses.dataclass(frozen=True)
class _TemplateSpec:
    """How nodes of one template describe their problems, what they try and what they log."""

    context_choices: Mapping[str, Sequence[object]]
    approach_dimensions: Mapping[str, Sequence[str]]
    baseline: tuple[float, float]  # range of the address's baseline primary metric
    # (baseline, delta, throughput factor) -> three metrics, named by metric_names.
    metrics: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, ...]]
    metric_names: tuple[str, str, str]


def _llm_metrics(base, delta, speed):
    loss = base * (1.0 - delta)
    return loss, np.exp(loss), speed * 2_000.0


def _vision_metrics(base, delta, speed):
    top1 = np.clip(base + 0.5 * delta, 0.0, 1.0)
    return top1, 1.0 - 0.25 * (1.0 - top1), speed * 800.0


def _tabular_metrics(base, delta, speed):
    auc = np.clip(base + 0.3 * delta, 0.5, 1.0)
    return auc, 1.4 * (1.0 - auc), speed * 100_000.0


_SPECS: dict[str, _TemplateSpec] = {
    "llm-finetune/v1": _TemplateSpec(
        context_choices={
            "task": ["causal-lm", "instruction-tuning", "summarization", "code-completion", "chat"],
            "model_family": ["llama", "mistral", "qwen", "gemma", "phi"],
            "params": [1.2e8, 1.1e9, 7e9, 1.3e10, 7e10],
            "dataset": ["c4", "fineweb", "the-pile", "starcoder", "openwebmath"],
            "seq_len": [1024, 2048, 4096, 8192],
        },
        approach_dimensions={
            "lr_schedule": ["cosine", "linear", "constant", "wsd", "inverse_sqrt"],
            "optimizer": ["adamw", "lion", "adafactor", "sophia", "muon"],
            "data_mix": ["code-heavy", "web-heavy", "balanced", "math-heavy"],
            "warmup": ["0.01", "0.03", "0.1"],
            "lora_rank": ["8", "16", "64"],
            "precision": ["bf16", "fp8"],
            "weight_decay": ["0", "0.1"],
        },
        baseline=(1.8, 3.2),
        metrics=_llm_metrics,
        metric_names=("eval_loss", "perplexity", "tokens_per_s"),
    ),
    "vision-classify/v1": _TemplateSpec(
        context_choices={
            "task": ["image-classification", "fine-grained", "medical-imaging", "satellite"],
            "model_family": ["resnet", "vit", "convnext", "efficientnet"],
            "params": [2.5e7, 8.6e7, 3e8, 6e8],
            "images": [5e4, 1.2e6, 1.4e7],
            "resolution": [224, 384, 512],
            "dataset": ["imagenet-1k", "inat21", "chexpert", "eurosat"],
        },
        approach_dimensions={
            "augment": ["randaugment", "mixup", "cutmix", "trivialaugment"],
            "optimizer": ["sgd", "adamw", "lamb", "lion"],
            "lr_schedule": ["cosine", "step", "onecycle"],
            "label_smoothing": ["0.1", "0.2"],
            "stochastic_depth": ["0.1", "0.2"],
            "ema": ["on"],
            "precision": ["bf16", "fp16"],
        },
        baseline=(0.55, 0.9),
        metrics=_vision_metrics,
        metric_names=("top1", "top5", "images_per_s"),
    ),
    "tabular-gbdt/v1": _TemplateSpec(
        context_choices={
            "task": ["binary-classification", "regression", "ranking", "multiclass"],
            "library": ["xgboost", "lightgbm", "catboost"],
            "rows": [1e4, 3e5, 5e6, 1e8],
            "features": [12, 64, 300, 2000],
            "depth": [4, 6, 8, 10],
        },
        approach_dimensions={
            "learning_rate": ["0.03", "0.1", "0.3"],
            "max_leaves": ["31", "127", "255"],
            "subsample": ["0.7", "0.9"],
            "colsample": ["0.5", "0.8"],
            "min_child_weight": ["1", "10"],
            "target_encoding": ["kfold", "none"],
            "early_stopping": ["50"],
        },
        baseline=(0.7, 0.95),
        metrics=_tabular_metrics,
        metric_names=("auc", "logloss", "rows_per_s"),
    ),
}
# Templates the simulator can play: shipped by qis_beam.address and described above.
_TEMPLATE_IDS = tuple(t for t in sorted(_SPECS) if t in TEMPLATES)


def _approach_catalogue(dimensions: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Canonical approach ids: single settings (dimensions interleaved), then pairs ``a+b``."""
    singles = [
        f"{dim}={values[j]}"
        for j in range(max(len(values) for values in dimensions.values()))
        for dim, values in dimensions.items()
        if j < len(values)
    ]
    pairs = sorted(
        "+".join(sorted((a, b)))
        for i, a in enumerate(singles)
        for b in singles[i + 1 :]
        if a.split("=", 1)[0] != b.split("=", 1)[0]
    )
    return tuple(singles + pairs)


_CATALOGUES = {t: _approach_catalogue(_SPECS[t].approach_dimensions) for t in _TEMPLATE_IDS}
MAX_APPROACHES = min(len(c) for c in _CATALOGUES.values())


def _distinct_problems(template_id: str) -> int:
    """How many addresses a template's context choices give once numbers are binned."""
    template = TEMPLATES[template_id]
    return math.prod(
        len({canonical_context(template, {key: value}) for value in values})
        for key, values in _SPECS[template_id].context_choices.items()
    )


# Addresses go round-robin over the templates, so the smallest one bounds the total.
MAX_ADDRESSES = len(_TEMPLATE_IDS) * min(_distinct_problems(t) for t in _TEMPLATE_IDS)

# Malformations, per reason: the variants used in turn (names go to truth.json).
_VARIANTS: dict[str, tuple[str, ...]] = {
    "oversize": ("long debug metric names", "full 250-value context embedding"),
    "undecodable": (
        "record cut short",
        "payload with a torn trailing field",
        "JSON line instead of an Envelope",
    ),
    "unsigned": ("empty signature",),
    "bad_signature": (
        "signature bit flipped",
        "signed by another node's key",
        "payload altered after signing",
    ),
    "unsupported_version": ("schema_version 2", "schema_version 0"),
    "node_id_mismatch": ("another node's node_id", "random node_id"),
    "unknown_node": ("key not in the registry",),
    "invalid_field": (
        "confidence in percent",
        "free-text approach_id",
        "outcome_type unset",
        "NaN outcome_delta",
        "emit_time 2h before event_time",
        "9 metrics",
        "8-byte packet_id",
        "truncated semantic_address",
        "upper-case template_id",
    ),
    "future_event_time": ("clock reset to 2100",),
}
_SIGNATURE_REASONS = ("unsigned", "bad_signature")


@dataclasses.dataclass(frozen=True)
class SwarmConfig:
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
        if self.signed:
            return INGEST_REASONS
        return tuple(r for r in INGEST_REASONS if r not in _SIGNATURE_REASONS)


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


def outcome_types(delta: np.ndarray, sample_count: np.ndarray) -> np.ndarray:
    """How a node reports what it measured: clear gain, small gain, loss or inconclusive."""
    inconclusive = (np.abs(delta) <= PARTIAL_DELTA) | (sample_count < MIN_SAMPLES)
    return np.select(
        [inconclusive, delta > RESOLVED_DELTA, delta > PARTIAL_DELTA],
        [int(OutcomeType.OPEN), int(OutcomeType.RESOLVED), int(OutcomeType.PARTIAL)],
        default=int(OutcomeType.CONTRADICTED),
    )


@dataclasses.dataclass
class _Swarm:
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


def _draw_problems(rng: np.random.Generator, config: SwarmConfig):
    template_ids, contexts, addresses, seen = [], [], [], set()
    attempts = 0
    while len(addresses) < config.addresses:
        attempts += 1
        if attempts > 100 * config.addresses + 1000:
            raise ValueError(
                f"cannot find {config.addresses} distinct problem contexts; use fewer addresses"
            )
        template_id = _TEMPLATE_IDS[len(addresses) % len(_TEMPLATE_IDS)]
        choices = _SPECS[template_id].context_choices
        context = {k: v[int(rng.integers(len(v)))] for k, v in choices.items()}
        address = semantic_address(template_id, context)
        if address in seen:  # two contexts in the same numeric bins are one problem
            continue
        seen.add(address)
        template_ids.append(template_id)
        contexts.append(context)
        addresses.append(address)
    return template_ids, contexts, addresses


def _draw_swarm(rng: np.random.Generator, config: SwarmConfig) -> _Swarm:
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
    approaches = [_CATALOGUES[t][:k] for t in template_ids]
    effects = np.round(rng.normal(0.0, EFFECT_SD, (a, k)), 6)
    for row in effects:
        best, second = np.argsort(-row, kind="stable")[:2]
        row[best] = max(row[best], round(row[second] + BEST_MARGIN, 6))
    baseline = np.array([rng.uniform(*_SPECS[t].baseline) for t in template_ids])

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
    return _Swarm(
        keys, unregistered, noise_sd, bias, habit, sample_scale, speed, template_ids, contexts,
        addresses, approaches, effects, baseline, popularity, node_sets, activity,
    )  # fmt: skip


@dataclasses.dataclass
class _Rows:
    """Per-packet draws for every original record (valid and malformed), vectorised."""

    address: np.ndarray
    node: np.ndarray
    approach: np.ndarray
    outcome_type: np.ndarray
    delta: np.ndarray
    confidence: np.ndarray
    sample_count: np.ndarray
    event: np.ndarray
    emit: np.ndarray
    metrics: tuple[np.ndarray, np.ndarray, np.ndarray]
    arrival: np.ndarray  # when the collector wrote it: fixes the log order
    packet_ids: bytes
    late: np.ndarray  # row indices (valid rows only)
    malformed: np.ndarray  # sorted row indices
    # Per malformed record: which other registered node and which unregistered key it may
    # use, and a random node_id.
    other_node: np.ndarray
    unregistered: np.ndarray
    random_ids: bytes

    def columns(self, rows: np.ndarray) -> tuple[list, ...]:
        """The packet fields of ``rows`` as Python lists (one chunk at a time: memory, speed)."""
        fields = (
            self.address,
            self.node,
            self.approach,
            self.outcome_type,
            self.delta,
            self.confidence,
            self.sample_count,
            self.event,
            self.emit,
            *self.metrics,
        )
        return tuple(f[rows].tolist() for f in fields)


def _draw_rows(rng: np.random.Generator, config: SwarmConfig, swarm: _Swarm, total: int) -> _Rows:
    counts = rng.multinomial(total, swarm.popularity)
    address = np.repeat(np.arange(config.addresses), counts)
    node = np.empty(total, dtype=np.int64)
    start = 0
    for a, count in enumerate(counts):
        members = swarm.node_sets[a]
        weights = swarm.activity[members] / swarm.activity[members].sum()
        node[start : start + count] = rng.choice(members, size=count, p=weights)
        start += count
    approach = rng.integers(0, config.approaches, total)
    sample_count = np.maximum(
        1, np.rint(swarm.sample_scale[node] * rng.lognormal(0.0, 0.5, total))
    ).astype(np.int64)
    sample_count = np.minimum(sample_count, 2**31)
    noise = np.clip(np.sqrt(REFERENCE_SAMPLES / sample_count), 0.25, 4.0) * swarm.noise_sd[node]
    delta = np.round(
        swarm.effects[address, approach] + swarm.bias[node] + noise * rng.standard_normal(total), 6
    )
    # Confidence grows with the evaluation size, slower for noisy nodes, times the node's habit.
    half = CONFIDENCE_HALF_SAMPLES * (swarm.noise_sd[node] / NOISE_MEDIAN) ** 2
    confidence = np.round(swarm.habit[node] * sample_count / (sample_count + half), 4)
    event = config.start_ms + rng.integers(0, config.span_ms, total)
    network = np.clip(np.rint(rng.lognormal(math.log(300.0), 1.2, total)), 5, 30_000)
    n_malformed = round(config.malformed_fraction * config.packets)
    malformed = np.sort(rng.choice(total, n_malformed, replace=False))
    valid = np.setdiff1d(np.arange(total), malformed)
    late = rng.choice(valid, round(config.late_fraction * config.packets), replace=False)
    network[late] = rng.integers(HOUR_MS, 6 * HOUR_MS + 1, late.size)  # reconnecting edge nodes
    emit = event + network.astype(np.int64)
    arrival = emit + np.clip(np.rint(rng.lognormal(math.log(250.0), 1.3, total)), 1, 600_000)

    base = swarm.baseline[address]
    speed = swarm.speed[node] * rng.lognormal(0.0, 0.1, total)
    metrics = (np.zeros(total), np.zeros(total), np.zeros(total))
    template_of_address = np.array(swarm.template_ids)[address] if total else np.array([])
    for template_id in sorted(set(swarm.template_ids)):
        rows = template_of_address == template_id
        values = _SPECS[template_id].metrics(base[rows], delta[rows], speed[rows])
        for column, value in zip(metrics, values, strict=True):
            column[rows] = np.round(value, 6)
    return _Rows(
        address, node, approach, outcome_types(delta, sample_count), delta, confidence,
        sample_count, event, emit, metrics, arrival.astype(np.int64), rng.bytes(16 * total),
        late, malformed,
        other_node=rng.integers(0, max(config.nodes - 1, 1), n_malformed),
        unregistered=rng.integers(0, UNREGISTERED_NODES, n_malformed),
        random_ids=rng.bytes(16 * n_malformed),
    )  # fmt: skip


@dataclasses.dataclass
class _Resends:
    """Re-sent copies of valid packets: each packet at most once, always after the original."""

    exact_sources: np.ndarray  # rows replayed byte for byte
    exact_arrival: np.ndarray
    conflict_sources: np.ndarray  # rows resent with a changed payload
    resend_after: np.ndarray  # ms between the original and the changed copy
    conflict_delta: np.ndarray
    conflict_type: np.ndarray


def _draw_resends(
    rng: np.random.Generator, config: SwarmConfig, swarm: _Swarm, rows: _Rows, valid_rows
) -> _Resends:
    resent = round(config.duplicate_fraction * config.packets)
    n_conflicting = round(CONFLICT_SHARE * resent)
    n_exact = resent - n_conflicting
    sources = rng.choice(valid_rows, resent, replace=False)
    exact, conflict = sources[:n_exact], sources[n_exact:]
    exact_arrival = rows.arrival[exact] + rng.integers(1_000, 900_001, n_exact)  # ack timeouts
    resend_after = rng.integers(60_000, 1_800_001, n_conflicting)
    delta = np.round(
        rows.delta[conflict]
        + 0.5 * swarm.noise_sd[rows.node[conflict]] * rng.standard_normal(n_conflicting),
        6,
    )
    delta[delta == rows.delta[conflict]] += 0.001
    outcome = outcome_types(delta, rows.sample_count[conflict])
    return _Resends(exact, exact_arrival, conflict, resend_after, delta, outcome)


def _extra_defect(reasons: Sequence[str], reason: str) -> str | None:
    """A defect that a later check would catch, compatible with ``reason``.

    Two checks later rather than the next one, because ``unsigned`` and ``bad_signature``
    cannot both hold.
    """
    i = reasons.index(reason)
    later = reasons[i + 2 : i + 3] or reasons[i + 1 : i + 2]
    return later[0] if later else None


def _break_field(packet: packet_pb2.OutcomePacket, variant: int) -> None:
    """One broken rule of spec section 2 that only the invalid_field check catches."""
    if variant == 0:
        packet.confidence = round(100.0 * max(packet.confidence, 0.05), 1)  # >= 5
    elif variant == 1:
        packet.approach_id = "Cosine LR schedule (tuned by hand)"
    elif variant == 2:
        packet.outcome_type = 0
    elif variant == 3:
        packet.outcome_delta = math.nan
    elif variant == 4:
        packet.emit_time_ms = packet.event_time_ms - 2 * HOUR_MS
    elif variant == 5:
        packet.metrics.clear()
        packet.metrics.update({f"eval/split_{j}": float(j) for j in range(9)})
    elif variant == 6:
        packet.packet_id = packet.packet_id[:8]
    elif variant == 7:
        packet.semantic_address = packet.semantic_address[:20]
    else:
        packet.template_id = packet.template_id.upper()


def _malformed_record(
    packet: packet_pb2.OutcomePacket,
    key: NodeKey,
    other: NodeKey | None,
    random_id: bytes,
    defects: Sequence[str],
    cycle: int,
    signed: bool,
) -> bytes:
    """Apply ``defects`` to a built packet, then seal and frame it as the node would."""

    def variant(reason: str) -> int:
        return cycle % len(_VARIANTS[reason])

    if "future_event_time" in defects:
        delay = packet.emit_time_ms - packet.event_time_ms
        packet.event_time_ms = FAR_FUTURE_MS + packet.event_time_ms % (365 * 24 * HOUR_MS)
        packet.emit_time_ms = packet.event_time_ms + delay
    if "unsupported_version" in defects:
        packet.schema_version = (2, 0)[variant("unsupported_version")]
    if "node_id_mismatch" in defects:
        use_other = other is not None and variant("node_id_mismatch") == 0
        packet.node_id = other.node_id if use_other else random_id
    if "invalid_field" in defects:
        _break_field(packet, variant("invalid_field"))
    if "oversize" in defects:
        if variant("oversize") == 0:
            packet.metrics.clear()
            for j in range(8):
                name = f"debug/layer_{j:02d}/grad_norm_histogram_p99_incl_embeddings_and_head"
                packet.metrics[name * 2] = float(j)
        else:
            packet.context_embedding.extend([0.001 * j for j in range(250)])

    sign_key = key if signed and "unsigned" not in defects else None
    record = seal(sign_key, packet, public_key=key.public_key)
    if "bad_signature" in defects:
        envelope = packet_pb2.Envelope.FromString(record)
        how = variant("bad_signature")
        if how == 1 and other is not None:
            envelope.signature = other.sign(envelope.payload)
        elif how == 2:
            packet.outcome_delta += 0.05
            envelope.payload = packet.SerializeToString(deterministic=True)
        else:
            envelope.signature = bytes([envelope.signature[0] ^ 0x01]) + envelope.signature[1:]
        record = envelope.SerializeToString()
    if "undecodable" in defects:
        how = variant("undecodable")
        if how == 0:
            record = record[:-10]  # cuts into public_key, the last field
        elif how == 1:
            envelope = packet_pb2.Envelope.FromString(record)
            envelope.payload += b"\x12\x10\x00\x01\x02"  # packet_id says 16 bytes, 3 follow
            record = envelope.SerializeToString()
        else:
            record = json.dumps(
                {"approach": packet.approach_id, "delta": packet.outcome_delta}
            ).encode()
    if "oversize" in defects and len(record) <= _POLICY_DEFAULTS.max_packet_bytes:
        raise AssertionError(f"oversize record has only {len(record)} bytes")
    return record


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
    """Shards of an earlier run with another shard count would join the input glob."""
    for name in os.listdir(out_dir):
        if _SHARD_NAME.fullmatch(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def _records_in_log_order(
    config: SwarmConfig, swarm: _Swarm, rows: _Rows, resends: _Resends, order: np.ndarray
) -> Iterator[tuple[bytes, dict | None]]:
    """Each record in log order, with its malformation (reason, also, variant) if malformed.

    ``order`` holds sequence numbers: rows first, then exact replays, then changed resends.
    """
    reasons = config.reasons()
    n_rows, n_exact = rows.address.size, resends.exact_sources.size
    malformed_index = {int(r): m for m, r in enumerate(rows.malformed)}
    replayed = set(resends.exact_sources.tolist())
    changed = set(resends.conflict_sources.tolist())
    kept_records: dict[int, bytes] = {}
    kept_packets: dict[int, packet_pb2.OutcomePacket] = {}
    per_address = [
        (address, t, approaches, _SPECS[t].metric_names)
        for address, t, approaches in zip(
            swarm.addresses, swarm.template_ids, swarm.approaches, strict=True
        )
    ]
    keys, signed = swarm.keys, config.signed

    for start in range(0, order.size, PROGRESS_EVERY):
        seqs = order[start : start + PROGRESS_EVERY]
        # Resent copies read some row's fields and ignore them.
        columns = rows.columns(np.minimum(seqs, max(n_rows - 1, 0)))
        address, node, approach, outcome, delta, confidence, samples, event, emit = columns[:9]
        first, second, third = columns[9:]
        for i, seq in enumerate(seqs.tolist()):
            if seq >= n_rows + n_exact:  # a resend with a changed payload
                j = seq - n_rows - n_exact
                source = int(resends.conflict_sources[j])
                packet = kept_packets.pop(source)
                packet.outcome_delta = float(resends.conflict_delta[j])
                packet.outcome_type = int(resends.conflict_type[j])
                packet.emit_time_ms += int(resends.resend_after[j])
                key = keys[int(rows.node[source])]
                yield seal(key if signed else None, packet, public_key=key.public_key), None
                continue
            if seq >= n_rows:  # an exact replay
                yield kept_records.pop(int(resends.exact_sources[seq - n_rows])), None
                continue
            address_bytes, template_id, approaches, names = per_address[address[i]]
            key = keys[node[i]]
            m = malformed_index.get(seq)
            if m is not None:
                reason, cycle = reasons[m % len(reasons)], m // len(reasons)
                extra = _extra_defect(reasons, reason) if cycle % 2 else None
                defects = (reason, extra) if extra else (reason,)
                if "unknown_node" in defects:
                    key = swarm.unregistered[int(rows.unregistered[m])]
            packet = build_packet(
                key=key,
                address=address_bytes,
                template_id=template_id,
                approach_id=approaches[approach[i]],
                outcome_type=outcome[i],
                outcome_delta=delta[i],
                confidence=confidence[i],
                sample_count=samples[i],
                event_time_ms=event[i],
                emit_time_ms=emit[i],
                metrics={names[0]: first[i], names[1]: second[i], names[2]: third[i]},
                packet_id=rows.packet_ids[16 * seq : 16 * seq + 16],
            )
            if m is None:
                record = seal(key if signed else None, packet, public_key=key.public_key)
                if seq in replayed:
                    kept_records[seq] = record
                if seq in changed:
                    kept_packets[seq] = packet
                yield record, None
                continue
            other = None
            if config.nodes > 1:
                other = keys[(node[i] + 1 + int(rows.other_node[m])) % config.nodes]
            random_id = rows.random_ids[16 * m : 16 * m + 16]
            record = _malformed_record(packet, key, other, random_id, defects, cycle, signed)
            variant = _VARIANTS[reason][cycle % len(_VARIANTS[reason])]
            yield record, {"reason": reason, "also": extra, "variant": variant}


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
    swarm = _draw_swarm(rng, config)
    total_rows = config.packets + round(config.malformed_fraction * config.packets)
    rows = _draw_rows(rng, config, swarm, total_rows)
    valid_rows = np.setdiff1d(np.arange(total_rows), rows.malformed)
    resends = _draw_resends(rng, config, swarm, rows, valid_rows)

    # Log order: by arrival at the collector (emit time plus a heavy-tailed delay).
    conflict_arrival = rows.arrival[resends.conflict_sources] + resends.resend_after
    arrival = np.concatenate([rows.arrival, resends.exact_arrival, conflict_arrival])
    order = np.lexsort((np.arange(arrival.size), arrival))
    n_records = int(order.size)
    records = _records_in_log_order(config, swarm, rows, resends, order)

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

    with open(os.path.join(out_dir, "nodes.txt"), "w", encoding="ascii") as f:
        f.write(
            f"# qis-beam node registry: {config.nodes} Ed25519 public keys (hex), one per line\n"
            f"# simulated swarm, seed {config.seed}\n"
        )
        f.writelines(key.public_key.hex() + "\n" for key in swarm.keys)

    report = SimulationReport(
        out_dir=out_dir,
        files=[os.path.join(out_dir, n) for n in (*shard_names, "nodes.txt", "truth.json")],
        records=n_records,
        valid=config.packets,
        duplicates=int(resends.exact_sources.size),
        malformed_by_reason=malformed_by_reason,
        late=int(rows.late.size),
        conflicting=int(resends.conflict_sources.size),
    )
    truth = _truth(config, swarm, rows, valid_rows, report, malformed_truth)
    with open(os.path.join(out_dir, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(truth, f, indent=1, sort_keys=True)
        f.write("\n")
    if progress is not None:
        progress(n_records, n_records)
    return report


def _truth(config, swarm, rows, valid_rows, report, malformed_truth) -> dict:
    valid_address = rows.address[valid_rows]
    n_packets = np.bincount(valid_address, minlength=config.addresses)
    pairs = np.unique(valid_address * config.nodes + rows.node[valid_rows])
    n_nodes = np.bincount(pairs // config.nodes, minlength=config.addresses)
    addresses = {}
    for a, address in enumerate(swarm.addresses):
        effects = dict(zip(swarm.approaches[a], swarm.effects[a].tolist(), strict=True))
        addresses[address.hex()] = {
            "template_id": swarm.template_ids[a],
            "context": swarm.contexts[a],
            "best_approach": swarm.approaches[a][int(np.argmax(swarm.effects[a]))],
            "effects": effects,
            "n_packets": int(n_packets[a]),
            "n_nodes": int(n_nodes[a]),
        }
    return {
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "addresses": addresses,
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
