"""Flink's REST API, the little of it qis-beam reads: the TaskManagers a cluster lists.

Both the local stack (is every TaskManager registered?) and the backfill's sizing (how much
task heap has a slot?) ask ``/taskmanagers``.
"""

from __future__ import annotations

import json
import urllib.request


def taskmanagers(rest: str, timeout_s: float = 3.0) -> list[dict]:
    """The TaskManagers the JobManager at ``rest`` (``host:port`` or a URL) lists, as Flink
    describes them (``id``, ``slotsNumber``, ``memoryConfiguration``, ...); dead ones stay
    listed until their heartbeat times out. Raises ``OSError`` when it does not answer."""
    base = rest if "://" in rest else f"http://{rest}"
    with urllib.request.urlopen(f"{base}/taskmanagers", timeout=timeout_s) as response:
        return json.load(response).get("taskmanagers", [])
