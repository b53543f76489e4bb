"""The client training nodes use to ask the query service (``qis-beam serve``).

    from qis_beam.client import IntelligenceClient
    with IntelligenceClient("127.0.0.1:50051") as client:
        print(client.recommend("llm-finetune/v1", {"task": "causal-lm", "params": 1e9}).best)

Every call has a deadline (``timeout``, seconds, covering its retries); ``UNAVAILABLE`` (the
service or its store is down) is retried with exponential backoff and jitter until the
deadline; other failures raise at once as :class:`QueryError` subclasses named after their
status: :class:`NotFound`, :class:`InvalidArgument`, :class:`Unauthenticated`, ...
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import grpc

from qis_beam.proto import query_pb2, query_pb2_grpc


class QueryError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(QueryError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(QueryError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(QueryError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(QueryError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(QueryError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_ERRORS = {cls.code: cls for cls in (NotFound, InvalidArgument, Unauthenticated, Unavailable)}
_ERRORS[grpc.StatusCode.DEADLINE_EXCEEDED] = DeadlineExceeded


@dataclasses.dataclass(frozen=True)
class Approach:
    approach_id: str
    n_packets: int
    n_nodes: int
    total_weight: float
    mean_delta: float | None
    success_mean: float


@dataclasses.dataclass(frozen=True)
class Provenance:
    run_id: str  # the run that wrote the snapshot
    snapshot_ms: int  # its snapshot time (latest event folded in; -1 when suppressed)
    written_ms: int


@dataclasses.dataclass(frozen=True)
class Recommendation:
    address: str
    template_id: str
    approaches: tuple[Approach, ...]  # ranked, best first
    recommended_approach: str | None
    suppressed: bool
    n_packets: int
    n_nodes: int
    synthesis_paths: int
    success_mean: float
    last_event_ms: int | None
    provenance: Provenance

    @property
    def best(self) -> Approach | None:
        return self.approaches[0] if self.approaches else None


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    """One synthesis record (spec sections 5 and 7) and its provenance in the store."""

    address: str
    template_id: str | None
    window_start_ms: int | None
    window_end_ms: int | None
    pane: dict[str, Any]
    suppressed: bool
    n_packets: int
    n_nodes: int
    synthesis_paths: int | None
    total_weight: float | None
    mean_delta: float | None
    delta_variance: float | None
    success_alpha: float | None
    success_beta: float | None
    success_mean: float | None
    outcome_counts: dict[str, int]
    approaches: tuple[Approach, ...]
    recommended_approach: str | None
    first_event_ms: int | None
    last_event_ms: int | None
    provenance: Provenance

    def to_record(self) -> dict[str, Any]:
        """The record as the pipeline wrote it (suppressed records keep only the counts)."""
        record: dict[str, Any] = {
            "address": self.address,
            "template_id": self.template_id,
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
            "pane": dict(self.pane),
        }
        if self.suppressed:
            del record["template_id"]
            record.update(n_packets=self.n_packets, n_nodes=self.n_nodes, suppressed=True)
            return record
        record.update(
            {
                name: getattr(self, name)
                for name in (
                    "n_packets",
                    "n_nodes",
                    "synthesis_paths",
                    "total_weight",
                    "mean_delta",
                    "delta_variance",
                    "success_alpha",
                    "success_beta",
                    "success_mean",
                )
            }
        )
        record["outcome_counts"] = dict(self.outcome_counts)
        record["approaches"] = [dataclasses.asdict(a) for a in self.approaches]
        record["recommended_approach"] = self.recommended_approach
        record["first_event_ms"] = self.first_event_ms
        record["last_event_ms"] = self.last_event_ms
        record["suppressed"] = False
        return record


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def _approach(a: query_pb2.Approach) -> Approach:
    return Approach(
        a.approach_id,
        a.n_packets,
        a.n_nodes,
        a.total_weight,
        _opt(a, "mean_delta"),
        a.success_mean,
    )


def _provenance(p: query_pb2.Provenance) -> Provenance:
    return Provenance(p.run_id, p.snapshot_ms, p.written_ms)


def _synthesis(s: query_pb2.Synthesis) -> SynthesisResult:
    visible = not s.suppressed
    return SynthesisResult(
        address=s.address,
        template_id=s.template_id or None,
        window_start_ms=_opt(s, "window_start_ms"),
        window_end_ms=_opt(s, "window_end_ms"),
        pane={"timing": s.pane.timing, "index": s.pane.index, "is_last": s.pane.is_last},
        suppressed=s.suppressed,
        n_packets=s.n_packets,
        n_nodes=s.n_nodes,
        synthesis_paths=s.synthesis_paths if visible else None,
        total_weight=s.total_weight if visible else None,
        mean_delta=_opt(s, "mean_delta"),
        delta_variance=_opt(s, "delta_variance"),
        success_alpha=s.success_alpha if visible else None,
        success_beta=s.success_beta if visible else None,
        success_mean=s.success_mean if visible else None,
        outcome_counts=dict(s.outcome_counts),
        approaches=tuple(_approach(a) for a in s.approaches),
        recommended_approach=s.recommended_approach or None,
        first_event_ms=_opt(s, "first_event_ms"),
        last_event_ms=_opt(s, "last_event_ms"),
        provenance=_provenance(s.provenance),
    )


def _context(context: Mapping[str, object]) -> dict[str, str]:
    """Context values as the wire's text; the server bins numbers like the emitter does."""
    out = {}
    for key, value in context.items():
        if isinstance(value, bool):
            out[str(key)] = "true" if value else "false"
        else:
            out[str(key)] = str(value)
    return out


def _target(request, address, template_id, context) -> None:
    if address is not None and template_id is not None:
        raise ValueError("give an address or a template_id with its context, not both")
    if address is not None:
        request.address = address
    elif template_id is not None:
        request.problem.template_id = template_id
        request.problem.context.update(_context(context or {}))
    else:
        raise ValueError("give an address, or a template_id and context")


class IntelligenceClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_root_cert: bytes | str | os.PathLike | None = None,
        timeout: float = 5.0,
        max_backoff_s: float = 1.0,
        tls_server_name: str | None = None,
    ):
        """``target`` is ``host:port``; ``tls_root_cert`` (PEM bytes or a file) turns TLS on;
        ``timeout`` is each call's deadline in seconds, retries included."""
        self.timeout = timeout
        self._max_backoff = max_backoff_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls_root_cert is not None:
            if not isinstance(tls_root_cert, bytes):
                with open(tls_root_cert, "rb") as f:
                    tls_root_cert = f.read()
            options = (
                [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
            )
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = query_pb2_grpc.IntelligenceServiceStub(self._channel)

    def _call(self, method, request, timeout: float | None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        backoff = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.001), metadata=self._metadata)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                pause = backoff * random.uniform(0.5, 1.0)
                if code is grpc.StatusCode.UNAVAILABLE and time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    backoff = min(backoff * 2, self._max_backoff)
                    continue
                raise _ERRORS.get(code, QueryError)(f"{code.name}: {details}", code) from None

    def recommend(
        self,
        template_id: str,
        context: Mapping[str, object],
        k: int = 5,
        timeout: float | None = None,
    ) -> Recommendation:
        """The ranked approaches for a problem (k = 0: every ranked approach)."""
        request = query_pb2.RecommendRequest(
            template_id=template_id, context=_context(context), k=k
        )
        r = self._call(self._stub.Recommend, request, timeout)
        return Recommendation(
            address=r.address,
            template_id=r.template_id,
            approaches=tuple(_approach(a) for a in r.approaches),
            recommended_approach=r.recommended_approach or None,
            suppressed=r.suppressed,
            n_packets=r.n_packets,
            n_nodes=r.n_nodes,
            synthesis_paths=r.synthesis_paths,
            success_mean=r.success_mean,
            last_event_ms=_opt(r, "last_event_ms"),
            provenance=_provenance(r.provenance),
        )

    def synthesis(
        self,
        address: str | None = None,
        *,
        template_id: str | None = None,
        context: Mapping[str, object] | None = None,
        timeout: float | None = None,
    ) -> SynthesisResult:
        """The latest all-time synthesis of an address (or of a template and context)."""
        request = query_pb2.GetSynthesisRequest()
        _target(request, address, template_id, context)
        return _synthesis(self._call(self._stub.GetSynthesis, request, timeout).synthesis)

    def windows(
        self,
        address: str | None = None,
        *,
        template_id: str | None = None,
        context: Mapping[str, object] | None = None,
        from_ms: int | None = None,
        to_ms: int | None = None,
        limit: int = 0,
        timeout: float | None = None,
    ) -> list[SynthesisResult]:
        """Window syntheses overlapping [from_ms, to_ms), by window start."""
        request = query_pb2.GetWindowsRequest(limit=limit)
        _target(request, address, template_id, context)
        if from_ms is not None:
            request.from_ms = from_ms
        if to_ms is not None:
            request.to_ms = to_ms
        reply = self._call(self._stub.GetWindows, request, timeout)
        return [_synthesis(s) for s in reply.windows]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IntelligenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
