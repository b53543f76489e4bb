"""Exact counts of a finite stream (replay), written once it drains.

The BundleBasedDirectRunner loses most counter updates of streaming bundles, so a replay's
summary is built from these records instead of from Beam metrics.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms import trigger, window

Tally = tuple[str, int]  # (counter name, count)


class TallyStream(beam.PTransform):
    """(records, first arrivals, duplicate ids) -> {"counter": name, "value": n} records."""

    def expand(self, tagged):
        records, packets, duplicates = tagged
        return (
            (
                records | "CountRecords" >> beam.Map(lambda _: ("records_in", 1)),
                packets | "CountValid" >> beam.Map(lambda _: ("valid", 1)),
                duplicates | "CountDuplicates" >> beam.Map(lambda _: ("duplicates", 1)),
            )
            | "AllTallies" >> beam.Flatten()
            | "TallyUntilDrained"
            >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterWatermark()),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "SumTallies" >> beam.CombinePerKey(sum).with_output_types(Tally)
            | "TallyRecord" >> beam.MapTuple(lambda name, count: {"counter": name, "value": count})
        )
