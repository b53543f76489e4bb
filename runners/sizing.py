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

Other clusters get a bound in proportion to their TaskManagers' task heap per slot, read from
Flink's REST API (``/taskmanagers``, the smallest of them) where ``--flink_master`` answers;
where it does not, the local stack's bound stands.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    PipelineOptions,
    StandardOptions,
)

from qis_beam.flink_rest import taskmanagers
from qis_beam.jobs import is_flink
from qis_beam.positions import estimated_records

#: Records a Flink batch subtask reads at most on the local stack's TaskManager: ~220 MB of
#: validation output in its heap, two such subtasks at once.
RECORDS_PER_SUBTASK = 8_000_000
#: That TaskManager's task heap per slot (638,876,367 bytes over two slots, from its REST API).
CALIBRATION_SLOT_HEAP = 319_438_183
#: Seconds to wait for the cluster's REST API before keeping the local stack's bound.
REST_TIMEOUT_S = 3.0


def slot_task_heap(flink_master: str | None) -> int | None:
    """The smallest task heap per slot (bytes) of the cluster's TaskManagers, or None when
    ``flink_master`` is not a REST address that answers (``[auto]``, ``[local]``, down)."""
    if not flink_master or flink_master.startswith("["):
        return None
    try:
        heaps = [
            tm["memoryConfiguration"]["taskHeap"] // tm["slotsNumber"]
            for tm in taskmanagers(flink_master, REST_TIMEOUT_S)
            if tm.get("slotsNumber")
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return min(heaps) if heaps else None


def records_per_subtask(slot_heap: int | None) -> int:
    """The bound for slots of ``slot_heap`` bytes (the local stack's without one)."""
    if not slot_heap:
        return RECORDS_PER_SUBTASK
    return max(1, RECORDS_PER_SUBTASK * slot_heap // CALIBRATION_SLOT_HEAP)


def flink_backfill_parallelism(
    options: PipelineOptions, input_bytes: int, explicit: bool
) -> str | None:
    """Raise a Flink batch job's ``--parallelism`` to one subtask per
    :func:`records_per_subtask` records (estimated from ``input_bytes``), and return the line
    that says so. A ``--parallelism`` the user gave (``explicit``) is kept; a too-small one
    gets a warning. Other runners and streaming jobs are left alone (``None``)."""
    if not is_flink(options) or options.view_as(StandardOptions).streaming:
        return None
    flink = options.view_as(FlinkRunnerOptions)
    records = estimated_records(input_bytes)
    bound = records_per_subtask(slot_task_heap(flink.flink_master))
    needed = -(-records // bound)
    current = flink.parallelism if flink.parallelism and flink.parallelism > 0 else 1
    if current >= needed:
        return None
    if explicit:
        return (
            f"warning: ~{records:,} records at --parallelism={current} on Flink: a subtask of "
            f"more than {bound:,} may run its TaskManager out of heap "
            f"(--parallelism={needed} or more avoids it)"
        )
    flink.parallelism = needed
    return (
        f"~{records:,} records: Flink --parallelism={needed} (at most "
        f"{bound:,} a subtask; a TaskManager holds a subtask's whole stage "
        f"output until the subtask ends)"
    )
