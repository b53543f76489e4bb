"""SHA-256 checks: every artifact the stack runs is compared with its pin before use."""

from __future__ import annotations

import hashlib
from pathlib import Path


class DigestMismatch(Exception):
    """A file whose SHA-256 differs from its pin; the message is one line."""

    def __init__(self, path: Path, expected: str, actual: str):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(
            f"refusing {path}: SHA-256 {actual} does not match the pinned {expected} "
            "(qis_beam/stack/pins.toml)"
        )


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise :class:`DigestMismatch` unless ``path`` hashes to ``expected``."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise DigestMismatch(path, expected.lower(), actual)
