"""The swarm simulator: believable packet logs with a known truth, as files or live.

The simulator plays a whole swarm: nodes with their own Ed25519 keys, noise and confidence
habits work on a few problems each, try approaches, measure a noisy delta around a hidden
true effect and emit packets built and sealed by the real emitter, addressed with the real
:func:`~qis_beam.address.semantic_address`. The log then carries what production logs carry:
arrival order only roughly by emit time, edge nodes that reconnect hours late, replayed
copies, resent packets that changed, and malformed records covering every ingestion reason.

Everything random comes from one ``numpy.random.Generator(PCG64(seed))`` (node key seeds and
packet ids included) and Ed25519 signatures are deterministic, so one seed gives
byte-identical files.

Modules, in the order data flows:

- ``templates``: per template the problems, approaches and metrics nodes work with.
- ``swarm``: :class:`SwarmConfig`, the nodes and problems, the hidden truth.
- ``defects``: one malformation per ingestion reason.
- ``packets``: per-record draws, re-sent copies, the records in log order.
- ``files``: :func:`simulate`, the TFRecord shards, ``nodes.txt`` and ``truth.json``.
- ``sending`` and ``live``: paced sending (``publish``) and the live swarm (``--live``).
- ``demo``: ``qis-beam demo``, simulate then backfill then query.
"""

from qis_beam.sim.files import SimulationReport, simulate
from qis_beam.sim.swarm import SwarmConfig

__all__ = ["SimulationReport", "SwarmConfig", "simulate"]
