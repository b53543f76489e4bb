"""Element shapes and time helpers shared by the streaming transforms.

Every keyed PCollection here is typed with plain ``tuple[...]`` hints so Beam picks
``TupleCoder`` / ``BytesCoder`` / ``StrUtf8Coder`` / ``VarIntCoder``: deterministic key
coders on every runner, and nothing pickled in a shuffle or in state.
"""

from __future__ import annotations

from apache_beam.utils.timestamp import Timestamp

# A valid first arrival on its way: (payload, record, source). The payload is the
# validated qis.v1.OutcomePacket bytes (the wire contract's versioned encoding).
PacketInfo = tuple[bytes, bytes, str]

# Dedupe input, keyed by the 16-byte packet_id.
ByPacketId = tuple[bytes, PacketInfo]


def ms_of(ts: Timestamp) -> int:
    return ts.micros // 1000


def ts_of(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)
