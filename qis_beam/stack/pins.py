"""The pinned engine artifacts (``pins.toml``, shipped as package data)."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@functools.cache
def pins() -> dict[str, Any]:
    """The parsed pins file: versions, URLs and SHA-256 digests of every artifact."""
    text = resources.files("qis_beam.stack").joinpath("pins.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def flink_version() -> str:
    return pins()["flink"]["version"]


def kafka_version() -> str:
    return pins()["kafka"]["version"]


def prism_version() -> str:
    return pins()["prism"]["version"]
