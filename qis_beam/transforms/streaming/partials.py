"""One-packet partial syntheses keyed by address, the input of the windowed synthesis."""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam

from qis_beam.partials import parse_payload, single_packet_partial
from qis_beam.synthesis import Synthesis
from qis_beam.transforms.streaming.common import PacketInfo


class _SinglePartialFn(beam.DoFn):
    def process(self, info: PacketInfo) -> Iterator[tuple[str, Synthesis]]:
        packet = parse_payload(info[0])
        yield packet.semantic_address.hex(), single_packet_partial(packet)


class PacketPartials(beam.PTransform):
    """One-packet partials keyed by address hex, keeping each packet's event timestamp."""

    def expand(self, packets):
        return packets | "OnePacketPartial" >> beam.ParDo(_SinglePartialFn()).with_output_types(
            tuple[str, Synthesis]
        )
