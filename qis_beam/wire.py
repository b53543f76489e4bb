"""The qis.v1 wire format of spec sections 2-4 in one place.

Outcome names and scores come from the proto enum, the id rules and their regexes, the
schema version, time constants, and (added by the parsing helpers below) the single way
records are decoded. Everything else imports these names instead of restating them.
"""

from __future__ import annotations

import re

from qis_beam.proto import packet_pb2

SCHEMA_VERSION = 1

# Time constants (milliseconds).
SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# Id rules (spec section 2).
PACKET_ID_BYTES = 16
NODE_ID_BYTES = 16
ADDRESS_BYTES = 32
TEMPLATE_ID_RE = re.compile(r"[a-z0-9_.:/-]{1,64}")
APPROACH_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.:=/+-]{0,63}")
MAX_METRICS = 8
MAX_EMBEDDING = 64

# Outcome types, named as the proto enum names them (OUTCOME_TYPE_UNSPECIFIED is invalid).
_ENUM = packet_pb2.OutcomeType
OUTCOME_NAMES: dict[int, str] = {v.number: v.name for v in _ENUM.DESCRIPTOR.values if v.number != 0}
OPEN = _ENUM.Value("OPEN")
# success score of each outcome type (spec section 5); OPEN carries no score.
OUTCOME_SCORES: dict[int, float | None] = {
    _ENUM.Value("RESOLVED"): 1.0,
    _ENUM.Value("PARTIAL"): 0.5,
    _ENUM.Value("CONTRADICTED"): 0.0,
    OPEN: None,
}
# Indexed by outcome type for the hot path: None for OPEN and for the invalid 0.
SCORE_BY_TYPE: tuple[float | None, ...] = tuple(
    OUTCOME_SCORES.get(t) for t in range(max(OUTCOME_SCORES) + 1)
)
