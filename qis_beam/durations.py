"""Durations as the command line writes them: ``90s``, ``10m``, ``1h``, ``7d`` (also ``500ms``).

Parsed here and rendered back (for ``--help`` defaults read from the settings dataclasses), so
a default is written once, in milliseconds, and shown the way a user would type it.
"""

from __future__ import annotations

import re

from qis_beam.wire import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS

_UNITS_MS = {"ms": 1, "s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration_ms(text: str) -> int:
    """Milliseconds in ``text``; ValueError with a readable message otherwise."""
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h, 7d)")
    return round(float(match.group(1)) * _UNITS_MS[match.group(2)])


def format_duration_ms(ms: int) -> str:
    """``ms`` in the largest unit that writes it whole (3_600_000 -> ``1h``); parses back."""
    if ms == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        if ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms"
