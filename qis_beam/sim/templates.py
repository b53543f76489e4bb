"""What the simulated nodes work on: per template, the problems, approaches and metrics.

Each template the simulator plays (one of :data:`qis_beam.address.TEMPLATES`) gets the
context values its nodes describe their problems with, the approach dimensions they try
(single settings and pairs of them), the range of the primary metric before any approach
and how the three logged metrics follow from a measured delta. The limits a
:class:`~qis_beam.sim.swarm.SwarmConfig` checks (:data:`MAX_APPROACHES`,
:data:`MAX_ADDRESSES`) follow from these tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qis_beam.address import TEMPLATES, canonical_context


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
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


SPECS: dict[str, TemplateSpec] = {
    "llm-finetune/v1": TemplateSpec(
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
    "vision-classify/v1": TemplateSpec(
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
    "tabular-gbdt/v1": TemplateSpec(
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
TEMPLATE_IDS = tuple(t for t in sorted(SPECS) if t in TEMPLATES)


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


CATALOGUES = {t: _approach_catalogue(SPECS[t].approach_dimensions) for t in TEMPLATE_IDS}
MAX_APPROACHES = min(len(c) for c in CATALOGUES.values())


def _distinct_problems(template_id: str) -> int:
    """How many addresses a template's context choices give once numbers are binned."""
    template = TEMPLATES[template_id]
    return math.prod(
        len({canonical_context(template, {key: value}) for value in values})
        for key, values in SPECS[template_id].context_choices.items()
    )


# Addresses go round-robin over the templates, so the smallest one bounds the total.
MAX_ADDRESSES = len(TEMPLATE_IDS) * min(_distinct_problems(t) for t in TEMPLATE_IDS)
