"""Optional BigQuery sink for synthesis records (Dataflow users).

The row keeps the fields people filter and join on as columns and the whole record as JSON,
so the schema does not change when the record gains a field.
"""

from __future__ import annotations

import json

import apache_beam as beam

SCHEMA = {
    "fields": [
        {"name": "address", "type": "STRING", "mode": "REQUIRED"},
        {"name": "template_id", "type": "STRING", "mode": "NULLABLE"},
        {"name": "window_start_ms", "type": "INT64", "mode": "NULLABLE"},
        {"name": "window_end_ms", "type": "INT64", "mode": "NULLABLE"},
        {"name": "pane_timing", "type": "STRING", "mode": "REQUIRED"},
        {"name": "pane_index", "type": "INT64", "mode": "REQUIRED"},
        {"name": "pane_is_last", "type": "BOOL", "mode": "REQUIRED"},
        {"name": "n_packets", "type": "INT64", "mode": "REQUIRED"},
        {"name": "n_nodes", "type": "INT64", "mode": "REQUIRED"},
        {"name": "recommended_approach", "type": "STRING", "mode": "NULLABLE"},
        {"name": "success_mean", "type": "FLOAT64", "mode": "NULLABLE"},
        {"name": "mean_delta", "type": "FLOAT64", "mode": "NULLABLE"},
        {"name": "suppressed", "type": "BOOL", "mode": "REQUIRED"},
        {"name": "record", "type": "STRING", "mode": "REQUIRED"},
    ]
}


def to_row(record: dict) -> dict:
    pane = record["pane"]
    return {
        "address": record["address"],
        "template_id": record.get("template_id"),
        "window_start_ms": record["window_start_ms"],
        "window_end_ms": record["window_end_ms"],
        "pane_timing": pane["timing"],
        "pane_index": pane["index"],
        "pane_is_last": pane["is_last"],
        "n_packets": record["n_packets"],
        "n_nodes": record["n_nodes"],
        "recommended_approach": record.get("recommended_approach"),
        "success_mean": record.get("success_mean"),
        "mean_delta": record.get("mean_delta"),
        "suppressed": record["suppressed"],
        "record": json.dumps(record, separators=(",", ":")),
    }


class WriteSynthesisToBigQuery(beam.PTransform):
    """Synthesis records -> rows appended to ``table`` (PROJECT:DATASET.TABLE), created
    if needed: file loads in batch, streaming inserts in streaming."""

    def __init__(self, table: str, streaming: bool):
        super().__init__()
        self._table = table
        self._streaming = streaming

    def expand(self, records):
        method = (
            # Python-native in both modes (the Storage Write API is a Java cross-language
            # transform that needs an expansion service jar from Maven Central).
            beam.io.WriteToBigQuery.Method.STREAMING_INSERTS
            if self._streaming
            else beam.io.WriteToBigQuery.Method.FILE_LOADS
        )
        return (
            records
            | "ToRow" >> beam.Map(to_row)
            | "WriteRows"
            >> beam.io.WriteToBigQuery(
                self._table,
                schema=SCHEMA,
                create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
                write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
                method=method,
            )
        )
