"""Through the command line: simulate -> backfill -> query, replay, bad input, the parser derived
from the settings, each command's own options, progress and pipes.

Pipelines run on the runner each test names: FnApiRunner (backfill), BundleBasedDirectRunner
(replay), DataflowRunner --dry_run (translation only, offline).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
from brute_force import assert_close

from qis_beam import options as table
from qis_beam.cli import main
from qis_beam.cli.parser import build_parser
from qis_beam.cli.pipelines import settings as settings_of
from qis_beam.settings import STREAMING_DEFAULTS, Settings, SourceSettings, WindowSettings
from qis_beam.transforms.outputs import read_json_lines
from qis_beam.wire import HOUR_MS


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    out = tmp_path_factory.mktemp("swarm")
    assert (
        main(
            [
                "simulate",
                "--out",
                str(out),
                "--packets",
                "3000",
                "--addresses",
                "6",
                "--nodes",
                "60",
                "--malformed-fraction",
                "0.01",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def backfilled(swarm, tmp_path_factory):
    output = tmp_path_factory.mktemp("backfill")
    code = main(
        [
            "backfill",
            "--input",
            str(swarm / "packets-*.tfrecord"),
            "--output",
            str(output),
            "--node-registry",
            str(swarm / "nodes.txt"),
            "--runner",
            "FnApiRunner",
        ]
    )
    assert code == 0
    return output


@pytest.mark.slow
def test_backfill_summary_balances_with_every_reason(swarm, backfilled, capsys):
    summary = json.loads((backfilled / "summary.json").read_text())
    truth = json.loads((swarm / "truth.json").read_text())
    expected = truth["counts"]["expected_summary"]
    assert summary["balanced"] is True
    assert summary["records_in"] == expected["records_in"]
    assert summary["valid"] == expected["valid"]
    assert summary["duplicates"] == expected["duplicates"]
    assert summary["dead_letters"]["by_reason"] == expected["dead_letters"]["by_reason"]
    assert all(n > 0 for n in summary["dead_letters"]["by_reason"].values())
    assert summary["runner"] == "FnApiRunner" and summary["wall_time_s"] > 0


@pytest.mark.slow
def test_query_by_context_matches_truth(swarm, backfilled, capsys):
    truth = json.loads((swarm / "truth.json").read_text())
    hits = 0
    for address, facts in truth["addresses"].items():
        context = [f"{k}={v}" for k, v in facts["context"].items()]
        capsys.readouterr()
        assert (
            main(
                [
                    "query",
                    "--store",
                    str(backfilled / "intelligence.db"),
                    "--template",
                    facts["template_id"],
                    "--context",
                    *context,
                ]
            )
            == 0
        )
        latest = json.loads(capsys.readouterr().out)
        assert latest["address"] == address and latest["window_start_ms"] is None
        hits += latest["recommended_approach"] == facts["best_approach"]
    # 3000 packets over 6 addresses: the synthesis finds nearly every true best approach
    assert hits >= len(truth["addresses"]) - 1


@pytest.mark.slow
def test_query_windows_and_errors(swarm, backfilled, capsys):
    address = next(iter(json.loads((swarm / "truth.json").read_text())["addresses"]))
    db = str(backfilled / "intelligence.db")
    assert main(["query", "--store", db, "--address", address, "--window"]) == 0
    windows = json.loads(capsys.readouterr().out)
    assert windows and all(w["window_start_ms"] is not None for w in windows)
    assert main(["query", "--store", db, "--address", "0" * 64]) == 3
    assert "no synthesis" in capsys.readouterr().err
    assert main(["query", "--store", str(backfilled / "missing.db"), "--address", "0" * 64]) == 3


@pytest.fixture
def one_log(tmp_path):
    """An input glob that matches (an empty log), so no case fails on "no files match"."""
    (tmp_path / "packets-0.tfrecord").write_bytes(b"")
    return str(tmp_path / "packets-*.tfrecord")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["backfill", "--input", "IN"], "the following arguments are required: --output"),
        (
            ["backfill", "--input", "/nonexistent/*.tfrecord", "--output", "OUT"],
            "--input /nonexistent/*.tfrecord: no files match",
        ),
        (["backfill", "--input", "IN", "--output", "OUT", "--window", "5q"], "not a duration"),
        (
            ["backfill", "--input", "IN", "--output", "OUT", "--bogus-flag", "1"],
            "unrecognized arguments: --bogus-flag 1",
        ),
        (
            ["backfill", "--input", "IN", "--output", "OUT", "--window-period", "25m"],
            "--window-period must be positive and divide --window",
        ),
        (
            ["backfill", "--input", "IN", "--output", "OUT", "--node-registry", "/nonexistent"],
            "--node-registry: ",
        ),
        (["simulate", "--out", "OUT", "--packets", "0"], "must be positive: '0'"),
        (["simulate", "--out", "OUT", "--approaches", "1"], "approaches must be in [2"),
        (["query", "--store", "x.db", "--address", "abc"], "--address must be 64 hex"),
        (["query", "--store", "x.db", "--template", "t/v1"], "--template needs --context"),
        (
            ["replay", "--input", "IN", "--output", "OUT", "--min-support", "-1"],
            "--min-support: must be positive: '-1'",
        ),
        (
            ["run", "--source", "kafka", "--output", "OUT"],
            "--source kafka needs --input-topic and --bootstrap-servers",
        ),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, one_log, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [one_log if a == "IN" else out if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    prefix = "qis-beam:" if argv == ["nonsense"] else f"qis-beam {argv[0]}"
    assert err.count("\n") == 1 and err.startswith(prefix), err
    assert message in err, err
    assert not os.path.exists(out)


STREAMING_ONLY = {
    "--allowed-lateness": "2h",
    "--early-firing-count": "5",
    "--early-firing-delay": "30s",
    "--emit-every": "5m",
    "--state-ttl": "1d",
    "--dedupe-ttl": "1d",
}
BATCH_ONLY = {"--hot-key-fanout": "4", "--dedupe-shards": "8", "--read-batch-size": "1000"}
RUN_ONLY = {"--flush-every": "1m", "--output-shards": "2", "--source": "kafka"}


def _refused(argv, flag, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "does not use it" in err, err
    return err


@pytest.mark.parametrize("flag", [*STREAMING_ONLY, "--watermark-delay", *RUN_ONLY])
def test_backfill_refuses_options_of_the_streaming_commands(flag, one_log, tmp_path, capsys):
    value = {**STREAMING_ONLY, **RUN_ONLY, "--watermark-delay": "2m"}[flag]
    base = ["backfill", "--input", one_log, "--output", str(tmp_path / "out")]
    for form in ([flag, value], [f"{flag}={value}"]):  # never forwarded to Beam, either form
        err = _refused([*base, *form], flag, capsys)
        assert err.startswith("qis-beam backfill: ") and "unrecognized" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", list(BATCH_ONLY))
def test_replay_and_run_refuse_batch_only_options(flag, one_log, tmp_path, capsys):
    replay = ["replay", "--input", one_log, "--output", str(tmp_path / "out")]
    run = ["run", "--input-topic", "projects/p/topics/t", "--output", str(tmp_path / "out")]
    for argv in (replay, run):
        err = _refused([*argv, flag, BATCH_ONLY[flag]], flag, capsys)
        assert err.startswith(f"qis-beam {argv[0]}: ") and "backfill" in err


@pytest.mark.parametrize("flag", ["--watermark-delay", *RUN_ONLY])
def test_replay_and_run_refuse_each_others_options(flag, one_log, tmp_path, capsys):
    value = {**RUN_ONLY, "--watermark-delay": "2m"}[flag]
    if flag == "--watermark-delay":
        argv = ["run", "--input-topic", "projects/p/topics/t", "--output", "o"]
    else:
        argv = ["replay", "--input", one_log, "--output", str(tmp_path / "out")]
    _refused([*argv, flag, value], flag, capsys)


def _parsed_settings(argv):
    args, beam_args = build_parser().parse_known_args(argv)
    assert beam_args == []
    return args, settings_of(args, args.command)


def _without_clock(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, validation=dataclasses.replace(settings.validation, now_ms=None)
    )


def test_derived_parser_defaults_are_the_dataclass_defaults():
    _, batch = _parsed_settings(["backfill", "--input", "i", "--output", "o"])
    assert batch.validation.now_ms is not None  # a bounded run fixes its clock
    assert _without_clock(batch) == Settings()
    _, replay = _parsed_settings(["replay", "--input", "i", "--output", "o"])
    assert _without_clock(replay) == STREAMING_DEFAULTS
    args, run = _parsed_settings(["run", "--output", "o"])
    assert run == STREAMING_DEFAULTS and run.validation.now_ms is None  # wall clock per record
    assert (
        table.source_from({o.flag: getattr(args, o.dest) for o in table.options_for("run")})
        == SourceSettings()
    )


def test_flags_set_their_fields():
    argv = ["replay", "--input", "i", "--output", "o", "--window", "2h", "--window-period"]
    argv += ["30m", "--max-clock-skew", "90s", "--min-nodes", "2", "--allow-unsigned"]
    argv += ["--dedupe-ttl", "3d", "--early-firing-count", "0", "--watermark-delay", "5s"]
    _, got = _parsed_settings(argv)
    assert (got.windows.size_ms, got.windows.period_ms) == (2 * HOUR_MS, HOUR_MS // 2)
    assert got.validation.max_clock_skew_ms == 90_000 and got.validation.allow_unsigned
    assert got.synthesis.min_nodes == 2 and got.windows.early_firing_count == 0
    assert got.stream.dedupe_ttl_ms == 72 * HOUR_MS and got.stream.watermark_delay_ms == 5_000


def test_defaults_and_help_follow_the_dataclass(monkeypatch, capsys):
    """A default changed in the settings changes the parser and its help, nowhere else."""
    changed = Settings(windows=WindowSettings(size_ms=2 * HOUR_MS))
    monkeypatch.setattr(table, "defaults_for", lambda command: changed)
    _, got = _parsed_settings(["backfill", "--input", "i", "--output", "o"])
    assert got.windows.size_ms == 2 * HOUR_MS
    with pytest.raises(SystemExit):
        main(["backfill", "--help"])
    assert "event-time window size (default 2h)" in " ".join(capsys.readouterr().out.split())


def test_help_exits_zero_and_lists_only_the_commands_options(capsys):
    helps = {}
    for command in ("backfill", "replay", "run"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        helps[command] = capsys.readouterr().out
    assert "--allowed-lateness" not in helps["backfill"] and "--hot-key-fanout" in helps["backfill"]
    assert "--allowed-lateness" in helps["replay"] and "--hot-key-fanout" not in helps["replay"]
    assert "--flush-every" in helps["run"] and "--watermark-delay" not in helps["run"]


@pytest.mark.slow
def test_replay_agrees_with_backfill_when_nothing_is_too_late(tmp_path, capsys):
    swarm = tmp_path / "swarm"
    # no duplicates: the streaming rule (first arrival wins) and the batch rule (smallest
    # payload wins) only differ on conflicting copies
    assert (
        main(
            [
                "simulate",
                "--out",
                str(swarm),
                "--packets",
                "1500",
                "--addresses",
                "4",
                "--nodes",
                "30",
                "--duplicate-fraction",
                "0",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    common = ["--input", str(swarm / "packets-*.tfrecord"), "--node-registry"]
    common.append(str(swarm / "nodes.txt"))
    batch = ["backfill", *common, "--output", str(tmp_path / "batch"), "--runner", "FnApiRunner"]
    assert main(batch) == 0
    replay = ["replay", *common, "--output", str(tmp_path / "stream")]
    replay += ["--allowed-lateness", "3d", "--dedupe-ttl", "7d", "--early-firing-count", "20"]
    assert main([*replay, "--runner", "BundleBasedDirectRunner"]) == 0
    captured = capsys.readouterr()
    assert "panes: EARLY=" in captured.out and "too_late=0" in captured.out
    assert captured.err == ""  # stderr is no terminal here: no progress

    def strip_pane(record):
        return {k: v for k, v in record.items() if k != "pane"}

    batch = list(read_json_lines(str(tmp_path / "batch"), "synthesis"))
    stream = list(read_json_lines(str(tmp_path / "stream"), "synthesis"))
    batch_windows = {(r["address"], r["window_start_ms"]): r for r in batch}
    last_panes = {}
    for r in stream:
        key = (r["address"], r["window_start_ms"])
        if key not in last_panes or r["pane"]["index"] > last_panes[key]["pane"]["index"]:
            last_panes[key] = r
    assert last_panes.keys() == batch_windows.keys()
    for key, record in last_panes.items():
        assert_close(strip_pane(record), strip_pane(batch_windows[key]), str(key))
    finals = [r for r in stream if r["window_start_ms"] is None and r["pane"]["is_last"]]
    assert {r["address"] for r in finals} == {a for a, w in batch_windows if w is None}
    timings = {r["pane"]["timing"] for r in stream if r["window_start_ms"] is not None}
    assert {"EARLY", "ON_TIME"} <= timings
    summary = json.loads((tmp_path / "stream" / "summary.json").read_text())
    assert summary["balanced"] and summary["runner"] == "BundleBasedDirectRunner"


# --- Dataflow dry runs through the CLI (offline: nothing is submitted, read or written) -------

DATAFLOW_DRY_RUN = [
    "--runner",
    "DataflowRunner",
    "--dry_run",  # Beam's option takes a value; the CLI accepts it as a switch too
    "--project",
    "qis-dry-run",
    "--region",
    "us-central1",
    "--temp_location",
    "gs://qis-dry-run/tmp",
]


@pytest.mark.slow
def test_backfill_dry_run_on_dataflow_translates_and_writes_nothing(swarm, tmp_path, capsys):
    output = tmp_path / "out"
    pattern = str(swarm / "packets-*.tfrecord")
    args = ["backfill", "--input", pattern, "--output", str(output), *DATAFLOW_DRY_RUN]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dry run: DataflowRunner translated the job (JOB_TYPE_BATCH" in out
    assert not output.exists()


@pytest.mark.slow
def test_run_dry_run_on_dataflow_translates_the_streaming_job(capsys):
    topic = "projects/qis-dry-run/topics/qis-packets"
    args = ["run", "--input-topic", topic, "--output", "gs://qis-dry-run/out", *DATAFLOW_DRY_RUN]
    assert main(args) == 0
    assert "translated the job (JOB_TYPE_STREAMING" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (("--project", "P"), "Invalid Project ID (P)"),
        (("--temp_location", "gs://B/tmp"), "Invalid GCS bucket (gs://B/tmp)"),
        (("--input-topic", "projects/P/topics/T"), "Invalid PubSub project name"),
    ],
)
def test_bad_cloud_names_are_one_line_and_exit_2(change, message, capsys):
    args = [
        "run",
        "--input-topic",
        "projects/qis-dry-run/topics/t",
        "--output",
        "gs://qis-dry-run/o",
    ]
    args += DATAFLOW_DRY_RUN
    flag, value = change
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("qis-beam run: ")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["backfill", "run"])
def test_profile_keeps_the_dry_run_switch(command, swarm, tmp_path, capsys):
    """``--profile dataflow --dry_run``: the switch is rewritten before the profile merge
    (DataflowRunner dry run; without the rewrite Beam reads ``--dry_run --project`` wrongly)."""
    output = tmp_path / "out"
    if command == "backfill":
        argv = ["backfill", "--input", str(swarm / "packets-*.tfrecord")]
    else:
        argv = ["run", "--input-topic", "projects/qis-dry-run/topics/qis-packets"]
    argv += ["--output", str(output), "--profile", "dataflow", "--dry_run"]
    argv += ["--project", "qis-dry-run", "--temp_location", "gs://qis-dry-run/tmp"]
    assert main(argv) == 0, capsys.readouterr().err
    kind = "BATCH" if command == "backfill" else "STREAMING"
    assert f"dry run: DataflowRunner translated the job (JOB_TYPE_{kind}" in capsys.readouterr().out
    assert not output.exists()


# --- progress and pipes ------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_off_unless_a_terminal_and_not_quiet():
    from qis_beam import progress

    assert not progress.wanted(quiet=False, stream=io.StringIO())
    assert progress.wanted(quiet=False, stream=_Terminal())
    assert not progress.wanted(quiet=True, stream=_Terminal())
    # With no display installed, reporting is a no-op (as on a remote worker).
    assert not progress.active() and progress.advance_batch([b"x" * 10]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True], ids=["terminal", "quiet"])
def test_backfill_progress_on_a_terminal(quiet, swarm, tmp_path, monkeypatch, capsys):
    """FnApiRunner in this process: the read step feeds the bar, up to the input's bytes."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["backfill", "--input", str(swarm / "packets-*.tfrecord"), "--output"]
    argv += [str(tmp_path / "out"), "--runner", "FnApiRunner"]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    shown = terminal.getvalue()
    if quiet:
        assert shown == ""
        return
    records = json.loads((tmp_path / "out" / "summary.json").read_text())["records_in"]
    assert "backfill: read" in shown and "100%" in shown
    assert f"{records:,} records" in shown
    from qis_beam import progress

    assert not progress.active()  # uninstalled once the run is over


@pytest.mark.slow
def test_query_into_a_closed_pipe_exits_quietly(swarm, backfilled):
    """``qis-beam query ... | head``: the reader went away; no traceback."""
    address = next(iter(json.loads((swarm / "truth.json").read_text())["addresses"]))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        argv = ["query", "--store", str(backfilled / "intelligence.db"), "--address", address]
        done = subprocess.run(
            [sys.executable, "-m", "qis_beam.cli", *argv, "--window"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "" and done.returncode == 1


def test_sigusr1_prints_every_threads_stack_and_the_command_goes_on():
    """``kill -USR1`` on a ``qis-beam`` process shows where each of its threads waits (a job
    that seems stuck); the process is not disturbed."""
    import signal
    import time

    script = (
        "import sys, threading, time\n"
        "from qis_beam.cli import main\n"
        "main(['query'])\n"  # a usage error (exit code 2): main ran, its handler is set
        "threading.Thread(target=time.sleep, args=(30,), name='waiter', daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(1.5)\n"
        "print('went on', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGUSR1)
        time.sleep(0.2)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "went on" in out
    assert err.count("most recent call first") >= 2  # the main thread and the waiter
