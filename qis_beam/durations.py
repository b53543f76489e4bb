"""Durations as the command line writes them: ``90s``, ``10m``, ``1h``, ``7d`` (also ``500ms``)."""

from __future__ import annotations

import re

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration_ms(text: str) -> int:
    """Milliseconds in ``text``; ValueError with a readable message otherwise."""
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h, 7d)")
    return round(float(match.group(1)) * _UNITS_MS[match.group(2)])
