"""Requests -> what to look up, or :class:`BadRequest` naming the field at fault (gRPC-free)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from qis_beam.address import semantic_address
from qis_beam.wire import TEMPLATE_ID_RE

MAX_K = 1000
MAX_WINDOWS = 10_000
DEFAULT_WINDOWS = 1000
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BadRequest(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_address(address: str, field: str = "address") -> str:
    address = address.strip().lower()
    if not _HEX64.fullmatch(address):
        raise BadRequest(field, "must be 64 hex characters (a semantic address)")
    return address


@functools.lru_cache(maxsize=100_000)
def _address(template_id: str, pairs: tuple[tuple[str, str], ...]) -> str:
    # A pure function of its arguments; nodes ask again and again for the same problems,
    # and canonicalisation is a fair share of a call's CPU.
    return semantic_address(template_id, dict(pairs)).hex()


def problem_address(template_id: str, context: Mapping[str, str], prefix: str = "") -> str:
    if not template_id:
        raise BadRequest(f"{prefix}template_id", "required")
    if not TEMPLATE_ID_RE.fullmatch(template_id):
        raise BadRequest(f"{prefix}template_id", "must match [a-z0-9_.:/-]{1,64}")
    try:
        return _address(template_id, tuple(sorted(context.items())))
    except ValueError as error:
        raise BadRequest(f"{prefix}context", str(error)) from None


def target_address(request) -> str:
    """The address of a request with ``oneof target { address, problem }``."""
    which = request.WhichOneof("target")
    if which == "address":
        return check_address(request.address)
    if which == "problem":
        return problem_address(request.problem.template_id, request.problem.context, "problem.")
    raise BadRequest("target", "set address, or problem (template_id and context)")


def window_range(request) -> tuple[int | None, int | None, int]:
    from_ms = request.from_ms if request.HasField("from_ms") else None
    to_ms = request.to_ms if request.HasField("to_ms") else None
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise BadRequest("to_ms", "must be greater than from_ms")
    if request.limit > MAX_WINDOWS:
        raise BadRequest("limit", f"at most {MAX_WINDOWS}")
    return from_ms, to_ms, request.limit or DEFAULT_WINDOWS


def check_k(k: int) -> int:
    if k > MAX_K:
        raise BadRequest("k", f"at most {MAX_K}")
    return k
