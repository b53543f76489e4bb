"""Store records (section-7 dicts) -> query.proto messages (gRPC-free)."""

from __future__ import annotations

from typing import Any

from qis_beam.proto import query_pb2
from qis_beam.store import StoredSynthesis


def approach(a: dict[str, Any]) -> query_pb2.Approach:
    msg = query_pb2.Approach(
        approach_id=a["approach_id"],
        n_packets=a["n_packets"],
        n_nodes=a["n_nodes"],
        total_weight=a["total_weight"],
        success_mean=a["success_mean"],
    )
    if a.get("mean_delta") is not None:
        msg.mean_delta = a["mean_delta"]
    return msg


def provenance(stored: StoredSynthesis) -> query_pb2.Provenance:
    return query_pb2.Provenance(
        run_id=stored.run_id, snapshot_ms=stored.snapshot_ms, written_ms=stored.written_ms
    )


_OPTIONAL = (
    "window_start_ms",
    "window_end_ms",
    "mean_delta",
    "delta_variance",
    "first_event_ms",
    "last_event_ms",
)
_PLAIN = (
    "n_packets",
    "n_nodes",
    "synthesis_paths",
    "total_weight",
    "success_alpha",
    "success_beta",
    "success_mean",
)


def synthesis(stored: StoredSynthesis) -> query_pb2.Synthesis:
    r = stored.record
    pane = r.get("pane") or {}
    msg = query_pb2.Synthesis(
        address=r["address"],
        template_id=r.get("template_id") or "",
        pane=query_pb2.Pane(
            timing=pane.get("timing", "UNKNOWN"),
            index=pane.get("index", 0),
            is_last=bool(pane.get("is_last")),
        ),
        suppressed=bool(r.get("suppressed")),
        outcome_counts=r.get("outcome_counts") or {},
        approaches=[approach(a) for a in r.get("approaches") or ()],
        recommended_approach=r.get("recommended_approach") or "",
        provenance=provenance(stored),
    )
    for name in _PLAIN:
        if r.get(name) is not None:
            setattr(msg, name, r[name])
    for name in _OPTIONAL:
        if r.get(name) is not None:
            setattr(msg, name, r[name])
    return msg


def recommendation(stored: StoredSynthesis, k: int) -> query_pb2.RecommendReply:
    r = stored.record
    ranked = r.get("approaches") or []
    msg = query_pb2.RecommendReply(
        address=r["address"],
        template_id=r.get("template_id") or "",
        approaches=[approach(a) for a in (ranked[:k] if k else ranked)],
        recommended_approach=r.get("recommended_approach") or "",
        suppressed=bool(r.get("suppressed")),
        n_packets=r.get("n_packets", 0),
        n_nodes=r.get("n_nodes", 0),
        synthesis_paths=r.get("synthesis_paths", 0),
        success_mean=r.get("success_mean") or 0.0,
        provenance=provenance(stored),
    )
    if r.get("last_event_ms") is not None:
        msg.last_event_ms = r["last_event_ms"]
    return msg
