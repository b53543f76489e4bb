"""Ed25519 node identities: keys, node ids and signatures (PyNaCl / libsodium).

PyNaCl is used rather than ``cryptography`` because verification is the ingestion hot
path and libsodium verifies about twice as fast here (beam-facts.md, "Speed").
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import nacl.bindings
import nacl.exceptions
import nacl.signing

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NODE_ID_BYTES = 16


def node_id_for(public_key: bytes) -> bytes:
    """The spec's node id: SHA-256(public_key)[:16]."""
    return hashlib.sha256(public_key).digest()[:NODE_ID_BYTES]


class NodeKey:
    """A training node's signing key."""

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._signing_key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: bytes = node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """Deterministic key from a 32-byte seed (the simulator's reproducible swarms)."""
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NodeKey:
        """Load a key file written by :meth:`save` (hex seed on one line)."""
        text = pathlib.Path(path).read_text(encoding="ascii").strip()
        return cls.from_seed(bytes.fromhex(text))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> NodeKey:
        """What a node does at start-up: reuse its identity, or create one on first run."""
        path = pathlib.Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: str | os.PathLike) -> None:
        """Write the private seed, readable by the owner only."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(bytes(self._signing_key).hex() + "\n")

    def sign(self, payload: bytes) -> bytes:
        return self._signing_key.sign(payload).signature


def verify(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``payload``; never raises."""
    # The raw libsodium binding: a VerifyKey object per call costs a third more.
    try:
        nacl.bindings.crypto_sign_open(signature + payload, public_key)
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False


Signed = tuple[bytes, bytes, bytes]  # (public_key, signature, payload)


def verify_many(items: Sequence[Signed]) -> list[bool]:
    """:func:`verify` for each item, in order."""
    return [verify(public_key, signature, payload) for public_key, signature, payload in items]


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ThreadedVerifier:
    """:func:`verify_many` spread over a thread pool.

    libsodium verifies without holding the GIL (cffi releases it around each C call), so
    threads put every core of a worker process to work on the most expensive check of
    ingestion; the Python part of each call still takes turns. Small batches stay on the
    calling thread. Not picklable: DoFns create it in ``setup``.
    """

    MIN_PER_THREAD = 256
    MAX_DEFAULT_THREADS = 8  # Dataflow runs one SDK process per core: don't square the count

    def __init__(self, threads: int | None = None):
        self.threads = threads or min(_usable_cores(), self.MAX_DEFAULT_THREADS)
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="qis-verify")
            if self.threads > 1
            else None
        )

    def __call__(self, items: Sequence[Signed]) -> list[bool]:
        if self._pool is None or len(items) < 2 * self.MIN_PER_THREAD:
            return verify_many(items)
        step = -(-len(items) // self.threads)
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        verdicts: list[bool] = []
        for part in self._pool.map(verify_many, chunks):
            verdicts.extend(part)
        return verdicts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def load_registry(path: str | os.PathLike) -> frozenset[bytes]:
    """Node registry: one hex raw 32-byte public key per line; blanks and # comments allowed.

    ``path`` may be local or on any Beam filesystem (``gs://`` for Dataflow templates).
    """
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(os.fspath(path), compression_type="uncompressed") as handle:
            text = handle.read().decode("utf-8")
    except Exception as error:  # noqa: BLE001 - Beam raises its own IOError subclasses
        raise OSError(f"cannot read node registry {path}: {error}") from None
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{path}:{number}: not hex: {text[:40]!r}") from None
        if len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"{path}:{number}: a public key has 32 bytes, got {len(key)}")
        keys.add(key)
    return frozenset(keys)
