"""Synthesis records for serving tests and the serving benchmark, made by the real
accumulator (qis_beam.synthesis) so every field is as the pipeline writes it."""

from __future__ import annotations

import random

from qis_beam.address import semantic_address
from qis_beam.synthesis import Synthesis, SynthesisParams
from qis_beam.transforms.synthesize import synthesis_record

TEMPLATE = "llm-finetune/v1"
HOUR_MS = 3_600_000
T0_MS = 1_767_225_600_000


def problem(i: int) -> dict[str, str]:
    return {"task": "causal-lm", "dataset": f"corpus-{i}", "params": "1e9"}


def address_of(i: int) -> str:
    return semantic_address(TEMPLATE, problem(i)).hex()


def records_for(i: int, packets: int = 40, seed: int = 0, min_nodes: int = 1) -> list[dict]:
    """All-time record + one record per hour window for problem ``i``."""
    rng = random.Random(seed * 1_000_003 + i)
    address = address_of(i)
    all_time, windows = Synthesis(), {}
    for _ in range(packets):
        event_ms = T0_MS + rng.randrange(3 * HOUR_MS)
        args = (
            bytes([rng.randrange(8)]) * 16,  # node id
            f"lr_schedule={rng.choice(['cosine', 'linear', 'constant', 'wsd'])}",
            rng.choice((1, 1, 2, 3, 4)),
            rng.gauss(0.02, 0.05),
            rng.random(),
            event_ms,
            TEMPLATE,
        )
        all_time.add(*args)
        start = event_ms - event_ms % HOUR_MS
        windows.setdefault(start, Synthesis()).add(*args)
    params = SynthesisParams(min_nodes=min_nodes)
    final = {"timing": "ON_TIME", "index": 0, "is_last": True}
    out = [synthesis_record(address, all_time, params, None, dict(final))]
    for start, s in sorted(windows.items()):
        out.append(synthesis_record(address, s, params, (start, start + HOUR_MS), dict(final)))
    return out
