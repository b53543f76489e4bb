"""One-packet partial syntheses keyed by address, the input of the windowed synthesis."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from qis_beam.partials import add_packet
from qis_beam.synthesis import Synthesis
from qis_beam.transforms.streaming.common import PacketInfo
from qis_beam.wire import decode_packet


class _SinglePartialFn(beam.DoFn):
    def process(self, info: PacketInfo) -> Iterator[tuple[str, Synthesis]]:
        packet = decode_packet(info[0])
        partial = Synthesis()
        add_packet(partial, packet)
        yield packet.semantic_address.hex(), partial


class PacketPartials(beam.PTransform):
    """One-packet partials keyed by address hex, keeping each packet's event timestamp."""

    def expand(self, packets):
        return packets | "OnePacketPartial" >> beam.ParDo(_SinglePartialFn()).with_output_types(
            tuple[str, Synthesis]
        )
