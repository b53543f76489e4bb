"""End to end through the command line: simulate -> backfill -> query, replay, bad input."""

from __future__ import annotations

import json
import math

import pytest

from qis_beam.cli import main
from qis_beam.transforms.outputs import read_json_lines


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


def test_query_windows_and_errors(swarm, backfilled, capsys):
    address = next(iter(json.loads((swarm / "truth.json").read_text())["addresses"]))
    db = str(backfilled / "intelligence.db")
    assert main(["query", "--store", db, "--address", address, "--window"]) == 0
    windows = json.loads(capsys.readouterr().out)
    assert windows and all(w["window_start_ms"] is not None for w in windows)
    assert main(["query", "--store", db, "--address", "0" * 64]) == 3
    assert "no synthesis" in capsys.readouterr().err
    assert main(["query", "--store", str(backfilled / "missing.db"), "--address", "0" * 64]) == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["backfill", "--input", "x"],
        ["backfill", "--input", "/nonexistent/*.tfrecord", "--output", "/tmp/x"],
        ["backfill", "--input", "x", "--output", "y", "--window", "5q"],
        ["backfill", "--input", "x", "--output", "y", "--bogus-flag", "1"],
        ["simulate", "--out", "/tmp/x", "--packets", "0"],
        ["simulate", "--out", "/tmp/x", "--approaches", "1"],
        ["query", "--store", "x.db", "--address", "abc"],
        ["query", "--store", "x.db", "--template", "t/v1"],
        ["replay", "--input", "x", "--output", "y", "--min-support", "-1"],
        ["run", "--source", "kafka", "--output", "y"],
        ["nonsense"],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["backfill", "--help"])
    assert exit_info.value.code == 0
    assert "--allowed-lateness" in capsys.readouterr().out


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


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
    common = [
        "--input",
        str(swarm / "packets-*.tfrecord"),
        "--node-registry",
        str(swarm / "nodes.txt"),
        "--allowed-lateness",
        "3d",
        "--dedupe-ttl",
        "7d",
    ]
    assert main(["backfill", *common, "--output", str(tmp_path / "batch")]) == 0
    assert (
        main(
            ["replay", *common, "--output", str(tmp_path / "stream"), "--early-firing-count", "20"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "panes: EARLY=" in out and "too_late=0" in out

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
        assert _close(strip_pane(record), strip_pane(batch_windows[key])), key
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


def test_backfill_dry_run_on_dataflow_translates_and_writes_nothing(swarm, tmp_path, capsys):
    output = tmp_path / "out"
    pattern = str(swarm / "packets-*.tfrecord")
    args = ["backfill", "--input", pattern, "--output", str(output), *DATAFLOW_DRY_RUN]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dry run: DataflowRunner translated the job (JOB_TYPE_BATCH" in out
    assert not output.exists()


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
