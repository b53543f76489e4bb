"""The streaming graph shared by ``replay`` (TestStream) and ``run`` (Kafka / Pub/Sub).

Only the source differs: it must yield ``(record bytes, source name)``. Windows, triggers,
lateness, dedupe, too-late reconciliation and all-time state are the same transforms on
every runner.
"""

from __future__ import annotations

import apache_beam as beam

from qis_beam.settings import Settings
from qis_beam.transforms.bigquery import WriteSynthesisToBigQuery
from qis_beam.transforms.outputs import DEAD_LETTERS_PREFIX, SYNTHESIS_PREFIX, TALLIES_PREFIX
from qis_beam.transforms.store_sink import WriteToStore
from qis_beam.transforms.streaming import (
    AllTimeSnapshots,
    FlagTooLate,
    IngestStream,
    PacketPartials,
    SynthesizeWindows,
    TallyStream,
)


def build_streaming_graph(
    records,
    output_dir: str,
    settings: Settings,
    write,
    tally: bool = False,
    bigquery_table: str | None = None,
    store_url: str | None = None,
):
    """records: PCollection of (record, source); ``write(output_dir, prefix)`` is the sink.

    ``store_url`` also upserts every snapshot into that store as it is produced.

    ``tally`` adds exact counts as ``tallies-*.jsonl`` once a finite stream drains (replay).
    """
    packets, ingest_dead, duplicates = records | "Ingest" >> IngestStream(
        settings.validation, settings.stream
    )
    if tally:
        (
            (records, packets, duplicates)
            | "Tally" >> TallyStream()
            | "WriteTallies" >> write(output_dir, TALLIES_PREFIX)
        )
    partials = packets | "Partials" >> PacketPartials()
    # Records of both syntheses come out in the global window, ready to be flattened.
    windowed = partials | "SynthesizeWindows" >> SynthesizeWindows(
        settings.windows, settings.synthesis
    )
    # All-time state folds raw payloads on its timer (O(1) work per packet), not partials.
    all_time = packets | "SynthesizeAllTime" >> AllTimeSnapshots(
        settings.stream, settings.synthesis
    )
    too_late = packets | "FlagTooLate" >> FlagTooLate(settings.windows)
    synthesis = (windowed, all_time) | "AllSynthesis" >> beam.Flatten()
    synthesis | "WriteSynthesis" >> write(output_dir, SYNTHESIS_PREFIX)
    if bigquery_table:
        synthesis | "WriteSynthesisToBigQuery" >> WriteSynthesisToBigQuery(bigquery_table, True)
    if store_url:
        synthesis | "WriteSynthesisToStore" >> WriteToStore(store_url)
    (
        (ingest_dead, too_late)
        | "AllDeadLetters" >> beam.Flatten()
        | "WriteDeadLetters" >> write(output_dir, DEAD_LETTERS_PREFIX)
    )
