"""The parallelism a Flink batch backfill needs so that no TaskManager runs out of heap.

Beam's Flink batch runner (the job server's Beam 2.62) runs a subtask's whole partition as one
bundle, and ``SdkHarnessClient.ActiveBundle.close()`` drains the bundle's output only after the
SDK worker has finished it: until then the output waits in the TaskManager's heap (a queue of
100 messages of up to 10 MB) and in the SDK worker's send queues (2 x 100 MB). Validation emits
~28 bytes per record (the dedupe's entries and the range descriptors), so the records one
subtask reads bound what its TaskManager must hold at once, whatever the parallelism.

Measured on the local stack (a TaskManager with a 738-MiB heap and two slots): a backfill of
24M records at parallelism 1 passed with the old generation full; 36M records ran the heap
out (``OutOfMemoryError`` in a gRPC thread parsing the SDK worker's output); the same 36M at
parallelism 8 and at the 6 this module picks, two subtasks at a time on the two slots, passed.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    StandardOptions,
)

from qis_beam.jobs import is_flink
from qis_beam.positions import estimated_records

#: Records a Flink batch subtask reads at most: ~220 MB of validation output in the
#: TaskManager's heap, two such subtasks at once on the local stack's TaskManager.
RECORDS_PER_SUBTASK = 8_000_000


def flink_backfill_parallelism(
    options: PipelineOptions, input_bytes: int, explicit: bool
) -> str | None:
    """Raise a Flink batch job's ``--parallelism`` to one subtask per ``RECORDS_PER_SUBTASK``
    records (estimated from ``input_bytes``), and return the line that says so. A
    ``--parallelism`` the user gave (``explicit``) is kept; a too-small one gets a warning.
    Other runners and streaming jobs are left alone (``None``)."""
    if not is_flink(options) or options.view_as(StandardOptions).streaming:
        return None
    flink = options.view_as(FlinkRunnerOptions)
    records = estimated_records(input_bytes)
    needed = -(-records // RECORDS_PER_SUBTASK)
    current = flink.parallelism if flink.parallelism and flink.parallelism > 0 else 1
    if current >= needed:
        return None
    if explicit:
        return (
            f"warning: ~{records:,} records at --parallelism={current} on Flink: a subtask of "
            f"more than {RECORDS_PER_SUBTASK:,} may run its TaskManager out of heap "
            f"(--parallelism={needed} or more avoids it)"
        )
    flink.parallelism = needed
    return (
        f"~{records:,} records: Flink --parallelism={needed} (at most "
        f"{RECORDS_PER_SUBTASK:,} a subtask; a TaskManager holds a subtask's whole stage "
        f"output until the subtask ends)"
    )
