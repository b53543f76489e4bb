"""Prism (Beam's Go portable runner, v2.77.0) on the streaming graph, against the
BundleBasedDirectRunner, and why ``replay`` stays on the latter.

What Prism runs like the DirectRunner: TestStream, the stateful dedupe with its expiry timer,
the all-time state with emission/TTL timers, conflicting duplicates, early and on-time panes.
What it does not (pinned below as strict xfails, so a Prism release that fixes them turns
these tests red and tells us to reconsider): an aggregation drops late data against its own
output watermark, which Prism holds back to the oldest element still buffered in *any*
window of the stage; so a too-late packet is let into a window that has already closed, and
a late packet of an accumulating window is labelled EARLY and followed by a second ON_TIME
pane; accumulating windows also get an extra final pane at end of window + lateness.
No Beam issue names these exactly; they fall under apache/beam#31438 (Prism triggers and
panes, open). Dynamic splitting of stateful bundles can process one key in two bundles at
once (apache/beam#35771): every Prism run here disables it.
"""

from __future__ import annotations

import apache_beam
import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration
from conftest import HOUR_MS, T0_MS, _stack_piece, make_record, node_key
from stream_script import stream_of

from qis_beam.beam_internals import UnsupportedBeamError
from qis_beam.beam_internals.replay_speedups import memoised_dofn_specs
from qis_beam.cli import main
from qis_beam.pipelines.streaming import build_streaming_graph
from qis_beam.replay import UnsupportedReplayRunner, check_replay_runner
from qis_beam.settings import Settings, StreamSettings, WindowSettings
from qis_beam.transforms.outputs import WriteJsonLinesOnDrain, read_json_lines
from qis_beam.validation import ValidationPolicy

MIN = 60_000
NOW = T0_MS + 100 * HOUR_MS


@pytest.fixture(scope="module")
def prism_endpoint(tmp_path_factory):
    """A Prism job service of ``qis-beam stack`` (stopped by PID when the module ends)."""
    yield from (p.endpoints["job_endpoint"] for _, p in _stack_piece(tmp_path_factory, "prism"))


def prism_options(endpoint: str) -> PipelineOptions:
    return PipelineOptions(
        [],
        runner="PortableRunner",
        job_endpoint=endpoint,
        environment_type="LOOPBACK",
        streaming=True,
        # Splitting a stateful bundle frees its residual keys while the primary may still
        # hold them: one key in two bundles at once, a lost dedupe write (apache/beam#35771).
        experiments=["prism_disable_sdf_split"],
    )


def direct_options() -> PipelineOptions:
    return PipelineOptions([], runner="BundleBasedDirectRunner", streaming=True)


def packet(i: int, event_ms: int, **fields) -> tuple[bytes, int]:
    record = make_record(
        node_key(1 + i % 3),
        packet_id=i.to_bytes(16, "big"),
        event_time_ms=event_ms,
        emit_time_ms=event_ms,
        **fields,
    )
    return record, event_ms


def run_graph(output: str, script, options: PipelineOptions, **settings_kw):
    """The project's streaming graph over a TestStream script: (windowed, all_time, dead)."""
    settings = Settings(validation=ValidationPolicy(now_ms=NOW), **settings_kw)
    stream = stream_of(script, settings)
    with beam.Pipeline(options=options) as p:
        build_streaming_graph(p | stream, output, settings, write=WriteJsonLinesOnDrain)
    synthesis = list(read_json_lines(output, "synthesis"))
    windowed = sorted(
        (
            (r["window_start_ms"], r["pane"]["index"], r["pane"]["timing"], r["n_packets"])
            for r in synthesis
            if r["window_start_ms"] is not None
        ),
    )
    all_time = sorted(
        # first_event_ms tells an address's lives apart (pane indexes restart at 0)
        (
            r["address"],
            r["first_event_ms"],
            r["pane"]["index"],
            r["n_packets"],
            r["pane"]["is_last"],
        )
        for r in synthesis
        if r["window_start_ms"] is None
    )
    dead = sorted((d["reason"], d["packet_id"]) for d in read_json_lines(output, "dead_letters"))
    return windowed, all_time, dead


@pytest.mark.slow
def test_state_timers_and_dedupe_run_on_prism_as_on_the_direct_runner(tmp_path, prism_endpoint):
    first, event_ms = packet(1, T0_MS + MIN, outcome_delta=0.9)
    conflicting, _ = packet(1, T0_MS + MIN, outcome_delta=0.1)  # same id, other payload
    script = [("add", [(first, event_ms), packet(2, T0_MS + 2 * MIN)]), ("wm", T0_MS + 5 * MIN)]
    script += [("add", [(first, event_ms)]), ("wm", T0_MS + 10 * MIN)]  # exact copy
    script += [("add", [(conflicting, event_ms)]), ("wm", T0_MS + 20 * MIN)]
    script += [("add", [packet(3, T0_MS + 25 * MIN)]), ("wm", T0_MS + 30 * MIN)]
    script += [("wm", T0_MS + m * MIN) for m in (40, 60, 80, 100, 120)]
    script += [("add", [(first, event_ms)])]  # after the 1 h dedupe TTL: counted again
    script += [("wm", T0_MS + m * MIN) for m in (150, 200, 250, 300, 330)]
    # an address idle for the 2 h state TTL is forgotten; a new packet starts it again
    script += [("add", [packet(4, T0_MS + 335 * MIN)]), ("wm", T0_MS + 340 * MIN)]
    settings = dict(
        windows=WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=4 * HOUR_MS),
        stream=StreamSettings(
            emit_every_ms=10 * MIN, state_ttl_ms=2 * HOUR_MS, dedupe_ttl_ms=HOUR_MS
        ),
    )
    direct = run_graph(str(tmp_path / "direct"), script, direct_options(), **settings)
    prism = run_graph(str(tmp_path / "prism"), script, prism_options(prism_endpoint), **settings)
    _, all_time, dead = prism
    assert dead == [("conflicting_duplicate", (1).to_bytes(16, "big").hex())]
    lives = [(index, n, last) for _, _, index, n, last in all_time]
    # one snapshot per 10-minute period with new data, a final one at the TTL, then anew
    assert lives == [(0, 2, False), (1, 3, False), (2, 4, False), (3, 4, True)] + [
        (0, 1, False),
        (1, 1, True),
    ]
    assert prism[1:] == direct[1:]


@pytest.mark.slow
def test_early_and_on_time_panes_match_the_direct_runner(tmp_path, prism_endpoint):
    windows = WindowSettings(size_ms=HOUR_MS, allowed_lateness_ms=30 * MIN, early_firing_count=2)
    script = [
        ("add", [packet(1, T0_MS + 1 * MIN), packet(2, T0_MS + 2 * MIN)]),
        ("wm", T0_MS + 10 * MIN),
        ("add", [packet(3, T0_MS + 3 * MIN)]),
        ("wm", T0_MS + 30 * MIN),
        ("add", [packet(4, T0_MS + 70 * MIN), packet(5, T0_MS + 71 * MIN)]),
        ("wm", T0_MS + HOUR_MS + 15 * MIN),
        ("wm", T0_MS + 2 * HOUR_MS + 40 * MIN),
    ]
    direct, _, _ = run_graph(str(tmp_path / "d"), script, direct_options(), windows=windows)
    prism, _, _ = run_graph(
        str(tmp_path / "p"), script, prism_options(prism_endpoint), windows=windows
    )
    expected = [
        (T0_MS, 0, "EARLY", 2),
        (T0_MS, 1, "ON_TIME", 3),
        (T0_MS + HOUR_MS, 0, "EARLY", 2),
        (T0_MS + HOUR_MS, 1, "ON_TIME", 2),
    ]
    assert direct == expected
    # The second window's two packets came in its early pane, so its on-time pane is empty,
    # and Prism does not fire an empty on-time pane (pinned by
    # test_prism_fires_an_empty_on_time_pane): its window ends with the early record.
    assert prism == expected[:3]


# --- Prism's late-data gaps, reduced to a bare GroupByKey (no project code involved) ------


def _panes(output: str, options: PipelineOptions, stream, mode, early=None, lateness_s=600):
    """(window start minute, pane index, timing, values) of a bare windowed GroupByKey."""

    class Describe(beam.DoFn):
        def process(self, kv, pane=beam.DoFn.PaneInfoParam, w=beam.DoFn.WindowParam):
            timing = {0: "EARLY", 1: "ON_TIME", 2: "LATE"}[pane.timing]
            yield {
                "start": int(w.start) // 60,
                "index": pane.index,
                "timing": timing,
                "values": sorted(kv[1]),
            }

    with beam.Pipeline(options=options) as p:
        (
            p
            | stream
            | beam.WindowInto(
                window.FixedWindows(3600),
                trigger=trigger.AfterWatermark(early=early, late=trigger.AfterCount(1)),
                accumulation_mode=mode,
                allowed_lateness=Duration(seconds=lateness_s),
            )
            | beam.GroupByKey()
            | beam.ParDo(Describe())
            | WriteJsonLinesOnDrain(output, "panes")
        )
    return sorted(
        (r["start"], r["index"], r["timing"], tuple(r["values"]))
        for r in read_json_lines(output, "panes")
    )


def _minutes(*events):
    stream = TestStream().with_output_types(tuple[str, int])
    for event in events:
        if isinstance(event, int):
            stream.advance_watermark_to(event * 60)
        else:
            stream.add_elements([TimestampedValue(("k", m), m * 60) for m in event])
    return stream.advance_watermark_to_infinity()


@pytest.mark.slow
def test_direct_runner_drops_too_late_data_while_another_window_is_buffered(tmp_path):
    # [0, 60) closes at 70; [60, 120) still buffers 65 when 30 arrives at watermark 75
    stream = _minutes([50, 65], 75, [30], 200)
    panes = _panes(str(tmp_path), direct_options(), stream, trigger.AccumulationMode.DISCARDING)
    assert panes == [(0, 0, "ON_TIME", (50,)), (60, 0, "ON_TIME", (65,))]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Prism 2.77 drops late data against an output watermark held by buffered "
    "elements of other windows: too-late 30 reopens closed window [0, 60) (apache/beam#31438)",
)
@pytest.mark.slow
def test_prism_drops_too_late_data_while_another_window_is_buffered(tmp_path, prism_endpoint):
    stream = _minutes([50, 65], 75, [30], 200)
    panes = _panes(
        str(tmp_path), prism_options(prism_endpoint), stream, trigger.AccumulationMode.DISCARDING
    )
    assert panes == [(0, 0, "ON_TIME", (50,)), (60, 0, "ON_TIME", (65,))]


LATE_SCRIPT = ([1, 2], 10, [3], 30, 50, 61, [4], 80, 100)


@pytest.mark.slow
def test_direct_runner_fires_a_late_pane_for_late_data(tmp_path):
    panes = _panes(
        str(tmp_path),
        direct_options(),
        _minutes(*LATE_SCRIPT),
        trigger.AccumulationMode.ACCUMULATING,
        early=trigger.AfterCount(2),
        lateness_s=1800,
    )
    assert panes == [
        (0, 0, "EARLY", (1, 2)),
        (0, 1, "ON_TIME", (1, 2, 3)),
        (0, 2, "LATE", (1, 2, 3, 4)),
    ]


def _empty_on_time_panes(output: str, options: PipelineOptions):
    """Both elements fire the early pane, so the discarding on-time pane is empty."""
    stream = _minutes([1, 2], 70)
    mode = trigger.AccumulationMode.DISCARDING
    return _panes(output, options, stream, mode, early=trigger.AfterCount(2))


EMPTY_ON_TIME_PANES = [(0, 0, "EARLY", (1, 2)), (0, 1, "ON_TIME", ())]


@pytest.mark.slow
def test_direct_runner_fires_an_empty_on_time_pane(tmp_path):
    assert _empty_on_time_panes(str(tmp_path), direct_options()) == EMPTY_ON_TIME_PANES


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Prism 2.77 fires no empty on-time pane though the windowing strategy says "
    "FIRE_ALWAYS (Java's ReduceFnRunner and Python's runners do)",
)
@pytest.mark.slow
def test_prism_fires_an_empty_on_time_pane(tmp_path, prism_endpoint):
    panes = _empty_on_time_panes(str(tmp_path), prism_options(prism_endpoint))
    assert panes == EMPTY_ON_TIME_PANES


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Prism 2.77 labels a late pane of an accumulating window EARLY, fires ON_TIME a "
    "second time, then a final LATE pane (apache/beam#31438)",
)
@pytest.mark.slow
def test_prism_fires_a_late_pane_for_late_data(tmp_path, prism_endpoint):
    panes = _panes(
        str(tmp_path),
        prism_options(prism_endpoint),
        _minutes(*LATE_SCRIPT),
        trigger.AccumulationMode.ACCUMULATING,
        early=trigger.AfterCount(2),
        lateness_s=1800,
    )
    assert panes == [
        (0, 0, "EARLY", (1, 2)),
        (0, 1, "ON_TIME", (1, 2, 3)),
        (0, 2, "LATE", (1, 2, 3, 4)),
    ]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Prism 2.77 repeats an accumulating window as a final LATE pane at end + allowed "
    "lateness though no data came (Java's ReduceFnRunner and Python's runners do not)",
)
@pytest.mark.slow
def test_no_extra_final_pane_in_accumulating_windows(tmp_path, prism_endpoint):
    stream = _minutes([1, 2, 3], 61, 100)
    panes = _panes(
        str(tmp_path), prism_options(prism_endpoint), stream, trigger.AccumulationMode.ACCUMULATING
    )
    assert panes == [(0, 0, "ON_TIME", (1, 2, 3))]


# --- replay: the runner it refuses, and the DirectRunner patch that lives only in a run -------


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-swarm")
    args = ["simulate", "--out", str(out), "--packets", "40", "--addresses", "2", "--nodes", "4"]
    assert main(args) == 0
    return ["--input", str(out / "packets-*.tfrecord"), "--node-registry", str(out / "nodes.txt")]


def test_replay_refuses_prism_in_one_line(tiny_swarm, tmp_path, capsys):
    code = main(["replay", *tiny_swarm, "--output", str(tmp_path / "o"), "--runner", "PrismRunner"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--runner PrismRunner is not supported by replay" in err and "#31438" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "runner",
    [
        "PrismRunner",
        "prism",
        "apache_beam.runners.portability.prism_runner.PrismRunner",
        "DirectRunner",
    ],
)
def test_replay_runner_check_refuses_prism_and_the_bare_direct_runner(runner):
    with pytest.raises(UnsupportedReplayRunner, match="is not supported by replay"):
        check_replay_runner(runner)


def test_replay_runner_check_names_the_direct_runner():
    qualified = "apache_beam.runners.direct.direct_runner.BundleBasedDirectRunner"
    assert check_replay_runner(qualified) == "BundleBasedDirectRunner"


def _originals():
    from apache_beam.runners.direct import transform_evaluator
    from apache_beam.transforms import userstate

    return [getattr(m, n) for m in (transform_evaluator, userstate) for n in SPEC_FUNCTIONS]


SPEC_FUNCTIONS = ("get_dofn_specs", "is_stateful_dofn")


class _Stateful(beam.DoFn):
    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())

    def process(self, element, count=beam.DoFn.StateParam(COUNT)):
        yield element


def test_dofn_spec_patch_lives_only_inside_a_replay_run():
    before = _originals()
    with pytest.raises(KeyError):  # restored even when the run fails
        with memoised_dofn_specs():
            assert userstate.get_dofn_specs is not before[2]
            # memoised per DoFn class (unpatched, every call builds new spec objects)
            assert userstate.get_dofn_specs(_Stateful()) is userstate.get_dofn_specs(_Stateful())
            assert userstate.is_stateful_dofn(_Stateful())
            raise KeyError
    assert _originals() == before
    assert userstate.get_dofn_specs(_Stateful()) is not userstate.get_dofn_specs(_Stateful())


def test_unsupported_beam_fails_clearly_and_patches_nothing(
    monkeypatch, tiny_swarm, tmp_path, capsys
):
    before = _originals()
    monkeypatch.setattr(apache_beam, "__version__", "2.78.0")
    with pytest.raises(UnsupportedBeamError, match=r"apache-beam 2\.77\.x, found 2\.78\.0"):
        with memoised_dofn_specs():
            pass
    assert _originals() == before
    code = main(["replay", *tiny_swarm, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "found 2.78.0" in err
    assert _originals() == before
