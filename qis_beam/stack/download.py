"""HTTP(S) downloads into the cache, checked against a pinned SHA-256 before they are kept."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from qis_beam.stack.digests import DigestMismatch, verify


def show_progress() -> bool:
    """Progress bars on an interactive terminal only; CI and log files stay quiet."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def fetch_file(url: str, dest: Path, sha256: str, size: int | None = None) -> bool:
    """Make ``dest`` the verified file behind ``url``; return True if it was downloaded.

    A cached ``dest`` is re-hashed and kept when it matches (no network). A cached file
    that does not match is an error, not silently replaced: something changed the cache.
    A fresh download is written to ``dest.part``, hashed while streaming and renamed only
    when the digest matches; otherwise it is deleted and :class:`DigestMismatch` names it.
    """
    if dest.exists():
        verify(dest, sha256)
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    bar = None
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = size or int(response.headers.get("Content-Length") or 0) or None
            if show_progress():
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                if bar is not None:
                    bar.update(len(block))
    except BaseException:
        part.unlink(missing_ok=True)  # never leave half a file that looks like a download
        raise
    finally:
        if bar is not None:
            bar.close()
    actual = digest.hexdigest()
    if actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise DigestMismatch(dest, sha256.lower(), actual)
    os.replace(part, dest)
    return True
