"""Argument types: text -> value, or ``argparse.ArgumentTypeError`` with one readable line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qis_beam.durations import format_duration_ms, parse_duration_ms


def duration(text: str) -> int:
    try:
        return parse_duration_ms(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]: {text!r}")
    return value


def transport_url(text: str):
    from qis_beam.transports import parse_transport_url

    try:
        return parse_transport_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def rate(text: str) -> float:
    from qis_beam.transports import parse_rate

    try:
        return parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


STORE_HELP = "store URL: sqlite:///PATH (or a path) or postgresql://USER@HOST:PORT/DB"


def store_url(text: str) -> str:
    from qis_beam.store import store_kind
    from qis_beam.store.url import sqlite_path

    try:
        if store_kind(text) == "sqlite":
            sqlite_path(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# The parse of each kind named in qis_beam.options (switch and choice need no type).
BY_KIND: dict[str, Callable[[str], Any] | None] = {
    "duration": duration,
    "positive_int": positive_int,
    "non_negative_int": non_negative_int,
    "text": None,
    "path": None,
    "choice": None,
    "switch": None,
}

METAVARS = {
    "duration": "DURATION",
    "positive_int": "N",
    "non_negative_int": "N",
    "path": "FILE",
    "text": "NAME",
}


def render(kind: str, value: Any) -> str:
    """A default as a user would type it (durations: ``1h``, not 3600000)."""
    return format_duration_ms(value) if kind == "duration" else str(value)
