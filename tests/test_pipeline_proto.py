"""What runners see: the pipeline protos of backfill and of the streaming graph.

Flink and Dataflow match state by step name and shuffle keys by their encoded bytes, so every
GroupByKey and stateful step must have a deterministic key coder; batch runners reject
processing-time triggers (beam-facts.md), so the backfill must contain none.
"""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.test_stream import TestStream

from qis_beam.pipelines.backfill import build_backfill
from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.settings import Settings, WindowSettings
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain

DETERMINISTIC = {"beam:coder:string_utf8:v1", "beam:coder:bytes:v1", "beam:coder:varint:v1"}
PORTABLE_STATE = {"read_modify_write_spec", "bag_spec", "combining_spec", "set_spec"}


def key_coder_urn(components, pcollection_id: str) -> str:
    coder = components.coders[components.pcollections[pcollection_id].coder_id]
    while coder.spec.urn == "beam:coder:length_prefix:v1":
        coder = components.coders[coder.component_coder_ids[0]]
    assert coder.spec.urn == "beam:coder:kv:v1", coder.spec.urn
    key = components.coders[coder.component_coder_ids[0]]
    while key.spec.urn == "beam:coder:length_prefix:v1":
        key = components.coders[key.component_coder_ids[0]]
    if key.spec.urn == "beam:coder:kv:v1":
        # A typed 2-tuple key, e.g. (packet_id, deadline), is deterministic when both parts
        # are: report the first part that is not, else the first part.
        parts = [coder_urns(components, c) for c in key.component_coder_ids]
        flat = [urn for urns in parts for urn in sorted(urns)]
        return next((urn for urn in flat if urn not in DETERMINISTIC), flat[0])
    return key.spec.urn


def coder_urns(components, coder_id: str) -> set[str]:
    """URNs of a coder and all its components (length prefixes looked through)."""
    coder = components.coders[coder_id]
    urns = set() if coder.spec.urn == "beam:coder:length_prefix:v1" else {coder.spec.urn}
    for component in coder.component_coder_ids:
        urns |= coder_urns(components, component)
    return urns


def state_coders(payload):
    """(state id, coder id) of every coder a ParDo's state specs name."""
    for state_id, spec in payload.state_specs.items():
        inner = getattr(spec, spec.WhichOneof("spec"))
        for field in ("coder_id", "element_coder_id", "accumulator_coder_id", "key_coder_id"):
            if getattr(inner, field, ""):
                yield state_id, getattr(inner, field)
        if getattr(inner, "value_coder_id", ""):
            yield state_id, inner.value_coder_id


def keyed_inputs(proto):
    """(label, key coder URN, state kinds) of every GroupByKey and stateful ParDo of ours.

    Beam's own file sink groups on one constant internal key (``WriteImpl``); it is not ours
    to type and is left out.
    """
    components = proto.components
    for transform in components.transforms.values():
        if "/WriteImpl/" in transform.unique_name:
            continue
        urn = transform.spec.urn
        if urn == common_urns.primitives.GROUP_BY_KEY.urn:
            (pcoll,) = transform.inputs.values()
            yield transform.unique_name, key_coder_urn(components, pcoll), []
        elif urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            if payload.state_specs or payload.timer_family_specs:
                main = next(p for t, p in transform.inputs.items() if t not in payload.side_inputs)
                kinds = [s.WhichOneof("spec") for s in payload.state_specs.values()]
                yield transform.unique_name, key_coder_urn(components, main), kinds


def has_processing_time(trigger) -> bool:
    kind = trigger.WhichOneof("trigger")
    if kind == "after_processing_time":
        return True
    inner = getattr(trigger, kind)
    children = []
    for field, value in inner.ListFields():
        if field.message_type is not None and field.message_type.name == "Trigger":
            children.extend(value if field.is_repeated else [value])
    return any(has_processing_time(child) for child in children)


def test_backfill_proto_keys_and_triggers(tmp_path, unrun_pipeline):
    (tmp_path / "packets-0.tfrecord").write_bytes(b"")
    pipeline = unrun_pipeline(PipelineOptions([], runner="FnApiRunner"))
    build_backfill(pipeline, str(tmp_path / "*.tfrecord"), str(tmp_path / "out"), Settings())
    proto = pipeline.to_runner_api()
    found = list(keyed_inputs(proto))
    labels = {label for label, _, _ in found}
    assert any("ShuffleByPacketId" in label for label in labels)
    assert any("GatherRanges" in label for label in labels)
    assert any("Synthesize/MergePerKey" in label for label in labels)
    for label, key, _ in found:
        assert key in DETERMINISTIC, (label, key)
    for strategy in proto.components.windowing_strategies.values():
        assert not has_processing_time(strategy.trigger)


# Every shuffle of the backfill and why it has many keys. A new GroupByKey fails this test
# until it is added here with its reason: a single-key (or few-key) stage is a funnel on
# Flink and Dataflow. Beam's file sink (WriteImpl) groups only file names, not packets.
BACKFILL_SHUFFLES = {
    "ReadPacketLogs/SpreadShards": "one key per input file (Reshuffle's random keys)",
    "ReadPacketLogs/SpreadRanges": "one key per range (random keys), each ~1/256 of the input",
    "Ingest/ShuffleByPacketId": "hash shards of packet_id, >= 512, sized from the input",
    "Ingest/GatherRanges": "one key per range of a file, each ~1/256 of the input",
    "FoldPackets/SpreadRangeGroups": "one key per range group (random keys)",
    "Synthesize/MergePerKey": "(address, window) and address; lifted partials",
}
SINGLE_KEY_TRANSFORMS = ("KeyWithVoid", "CombineGlobally", "Globally", "ToList")


def test_backfill_has_no_single_key_stage(tmp_path, unrun_pipeline):
    (tmp_path / "packets-0.tfrecord").write_bytes(b"")
    pipeline = unrun_pipeline(PipelineOptions([], runner="FnApiRunner"))
    build_backfill(pipeline, str(tmp_path / "*.tfrecord"), str(tmp_path / "out"), Settings())
    transforms = pipeline.to_runner_api().components.transforms.values()
    ours = [t for t in transforms if "/WriteImpl/" not in t.unique_name]
    for t in ours:
        assert not any(marker in t.unique_name for marker in SINGLE_KEY_TRANSFORMS), t.unique_name
    shuffles = [
        t.unique_name for t in ours if t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn
    ]
    assert {
        next((known for known in BACKFILL_SHUFFLES if label.startswith(known)), label)
        for label in shuffles
    } == set(BACKFILL_SHUFFLES)


def test_streaming_proto_uses_portable_state_and_deterministic_keys(tmp_path, unrun_pipeline):
    windows = WindowSettings(early_firing_count=10, early_firing_delay_ms=30_000)
    pipeline = unrun_pipeline(PipelineOptions([], streaming=True))
    records = pipeline | TestStream().with_output_types(tuple[bytes, str])
    build_streaming_graph(
        records, str(tmp_path), Settings(windows=windows), write=WriteJsonLinesOnDrain, tally=True
    )
    found = list(keyed_inputs(pipeline.to_runner_api()))
    stateful = [(label, kinds) for label, _, kinds in found if kinds]
    assert {label.split("/")[0] for label, _ in stateful} >= {
        "Ingest",
        "SynthesizeAllTime",
        "FlagTooLate",
    }
    for label, key, kinds in found:
        assert key in DETERMINISTIC, (label, key)
        assert set(kinds) <= PORTABLE_STATE, (label, kinds)
    # the processing-time early firing exists only in the streaming graph
    strategies = pipeline.to_runner_api().components.windowing_strategies.values()
    assert any(has_processing_time(s.trigger) for s in strategies)


def test_streaming_state_is_never_pickled(tmp_path, unrun_pipeline):
    """Every state cell of the streaming graph uses a standard coder: no PickleCoder (nor any
    Python-pickled coder), so state survives SDK upgrades, savepoints and pipeline updates."""
    pipeline = unrun_pipeline(PipelineOptions([], streaming=True))
    records = pipeline | TestStream().with_output_types(tuple[bytes, str])
    build_streaming_graph(records, str(tmp_path), Settings(), write=WriteJsonLinesOnDrain)
    components = pipeline.to_runner_api().components
    cells = []
    for transform in components.transforms.values():
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        for state_id, coder_id in state_coders(payload):
            urns = coder_urns(components, coder_id)
            cells.append((transform.unique_name, state_id))
            # A kv of standard coders (the too-late marks) is itself a standard coder.
            standard = DETERMINISTIC | {"beam:coder:bool:v1", "beam:coder:kv:v1"}
            assert urns <= standard, (transform.unique_name, urns)
    labels = {label.split("/")[0] for label, _ in cells}
    assert labels >= {"Ingest", "SynthesizeAllTime", "FlagTooLate"}, cells


# The state of a running stream, by step: Flink savepoints and Dataflow updates match state
# by step name (and state cells by id), so renaming any of these drops its state on the next
# deploy. Change this list only knowing that a running stream must then start afresh.
STREAM_STATE = {
    "Ingest/FirstArrivalPerPacket/ParDo(_FirstArrivalFn)": {"digest", "ts-expiry"},
    "SynthesizeWindows/MergePerAddressWindow/GroupByKey": set(),
    "SynthesizeWindows/AccumulatePanes": {"panes", "synthesis", "ts-expiry"},
    "SynthesizeAllTime/FoldAndSnapshot": {
        "dirty",
        "last_event_ms",
        "next_emit_ms",
        "pending",
        "pending_bytes",
        "snapshots",
        "synthesis",
        "timer_at_ms",
        "ts-wake",
    },
    "FlagTooLate/IdsThatMadeItEachPane": set(),
    "FlagTooLate/ReconcileMarksPerPacket": {"marks", "ts-check"},
    "WriteSynthesis/GroupByShard": set(),
    "WriteDeadLetters/GroupByShard": set(),
}


def stream_state(proto) -> dict[str, set[str]]:
    """{label: state and timer ids} of every GroupByKey and stateful ParDo of ours."""
    found = {}
    for transform in proto.components.transforms.values():
        if transform.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn:
            found[transform.unique_name] = set()
        elif transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            cells = set(payload.state_specs) | set(payload.timer_family_specs)
            if cells:
                found[transform.unique_name] = cells
    return found


@pytest.mark.parametrize("kind", ["pubsub", "kafka"])
def test_stateful_step_labels_of_the_stream_are_pinned(tmp_path, kind, unrun_pipeline):
    """The ``run`` graph, with the store sink: its stateful steps and their cells are exactly
    the committed ones."""
    from qis_beam.pipelines.run import SourceSettings, build_run

    source = {
        "pubsub": SourceSettings(kind="pubsub", topic="projects/qis-dry-run/topics/packets"),
        "kafka": SourceSettings(kind="kafka", topic="packets", bootstrap_servers="127.0.0.1:1"),
    }[kind]
    pipeline = unrun_pipeline(PipelineOptions(["--streaming"]))
    build_run(pipeline, source, str(tmp_path), Settings(), store_url=f"sqlite://{tmp_path}/s.db")
    assert stream_state(pipeline.to_runner_api()) == STREAM_STATE


DRY_RUN = [
    "--runner=DataflowRunner",
    "--project=qis-dry-run",
    "--region=us-central1",
    "--temp_location=gs://qis-dry-run/tmp",
    "--dry_run=True",
]


@pytest.mark.slow
def test_bigquery_sink_translates_for_dataflow(tmp_path):
    """The optional BigQuery sink, batch and streaming, as Dataflow would build it (offline)."""
    from qis_beam.pipelines.run import SourceSettings, build_run

    (tmp_path / "packets-0.tfrecord").write_bytes(b"")
    table = "qis-dry-run:qis.synthesis"
    batch = beam.Pipeline(options=PipelineOptions(DRY_RUN))
    build_backfill(batch, str(tmp_path / "*.tfrecord"), "gs://qis-dry-run/out", Settings(), table)
    assert batch.run().job.proto.type.name == "JOB_TYPE_BATCH"
    stream = beam.Pipeline(options=PipelineOptions([*DRY_RUN, "--streaming"]))
    source = SourceSettings(kind="pubsub", topic="projects/qis-dry-run/topics/packets")
    build_run(stream, source, "gs://qis-dry-run/out", Settings(), table)
    assert stream.run().job.proto.type.name == "JOB_TYPE_STREAMING"
    names = [t.unique_name for t in stream.to_runner_api().components.transforms.values()]
    assert any("WriteSynthesisToBigQuery" in name for name in names)
