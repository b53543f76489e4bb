"""qis-beam report: loader, intervals, figures and page on generated outputs; the whole
pipeline (simulate + backfill on the FnApiRunner, replay on the BundleBasedDirectRunner)
rendered in headless Chromium (Debian's ``chromium`` package)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qis_beam.cli import main
from qis_beam.report import NoOutputs, write_report
from qis_beam.report.figures import accuracy_figure
from qis_beam.report.load import (
    final_windows,
    latest_all_time,
    load_outputs,
    pane_stats,
    ranked_approaches,
    truth_points,
    truth_rows,
)

HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
A1, A2 = "a1" * 32, "b2" * 32


# ---------------------------------------------------------------------- generated outputs


def _approach(aid, mean, n=10, tw=5.0, delta=0.01):
    return {
        "approach_id": aid,
        "n_packets": n,
        "n_nodes": n,
        "total_weight": tw,
        "mean_delta": delta,
        "success_mean": mean,
    }


def _record(
    address,
    approaches,
    *,
    window=None,
    timing="ON_TIME",
    index=0,
    last=True,
    n=40,
    last_event=None,
    template="t/v1",
):
    start, end = (window, window + HOUR) if window is not None else (None, None)
    return {
        "address": address,
        "template_id": template,
        "window_start_ms": start,
        "window_end_ms": end,
        "pane": {"timing": timing, "index": index, "is_last": last},
        "n_packets": n,
        "n_nodes": 8,
        "synthesis_paths": 28,
        "total_weight": 20.0,
        "mean_delta": 0.01,
        "delta_variance": 0.0001,
        "success_alpha": 12.0,
        "success_beta": 8.0,
        "success_mean": 0.6,
        "outcome_counts": {"RESOLVED": 10, "PARTIAL": 10, "CONTRADICTED": 10, "OPEN": 10},
        "approaches": approaches,
        "recommended_approach": approaches[0]["approach_id"] if approaches else None,
        "first_event_ms": T0,
        "last_event_ms": last_event or T0 + HOUR,
        "suppressed": False,
    }


def _write_outputs(folder, records, dead_letters=(), summary=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "synthesis-00000-of-00001.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(folder, "dead_letters-00000-of-00001.jsonl"), "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in dead_letters)
    if summary is not None:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(summary, f)
    return str(folder)


EVIL = "<script>alert(1)</script>"
TOP = [_approach("lr=0.1", 0.8), _approach(EVIL, 0.6), _approach("lr=0.3", 0.4)]


@pytest.fixture
def replay_like(tmp_path):
    """Two addresses: A1 with early, on-time and late panes and three snapshots; A2 batch-like."""
    records = [
        _record(A1, TOP, window=T0, timing="EARLY", index=0, last=False, n=20),
        _record(A1, TOP, window=T0, timing="ON_TIME", index=1, last=False, n=36),
        _record(A1, TOP, window=T0, timing="LATE", index=2, last=True, n=40),
        _record(A1, TOP[:2], window=T0 + HOUR, n=30),
        _record(A1, TOP[:1], index=0, n=20, last_event=T0 + 10),
        _record(A1, TOP, index=2, n=70, last_event=T0 + 2 * HOUR),
        _record(A1, TOP[:2], index=1, n=50, last_event=T0 + HOUR),
        # State expired and restarted: index 0 again, but the newest evidence.
        _record(A1, TOP, index=0, n=5, last_event=T0 + 30 * HOUR),
        _record(A2, TOP[::-1], window=T0, n=12),
        _record(A2, TOP[::-1], n=12),
    ]
    dead = [{"reason": "oversize"}] * 3 + [{"reason": "too_late"}] * 2
    summary = {
        "records_in": 100,
        "valid": 90,
        "duplicates": 7,
        "dead_letters": {"total": 3, "by_reason": {"oversize": 3}},
        "too_late": 2,
        "balanced": True,
        "addresses": 2,
        "windows": 2,
        "runner": "TestRunner",
        "wall_time_s": 1.5,
    }
    return _write_outputs(tmp_path / "out", records, dead, summary)


def test_loader_picks_newest_snapshot_and_last_panes(replay_like):
    outputs = load_outputs(replay_like)
    latest = latest_all_time(outputs)
    assert latest[A1]["n_packets"] == 5 and latest[A2]["n_packets"] == 12
    windows = final_windows(outputs)
    assert [w["n_packets"] for w in windows[A1]] == [40, 30]
    assert [w["pane"]["timing"] for w in windows[A1]] == ["LATE", "ON_TIME"]
    stats = pane_stats(outputs)
    assert stats.counts == {"EARLY": 1, "ON_TIME": 3, "LATE": 1, "UNKNOWN": 0}
    assert (stats.windows, stats.multi_pane_windows, stats.snapshots) == (3, 1, 5)
    assert stats.late_packets == 4 and stats.streaming
    assert ("EARLY", 0.5) in stats.shares and ("ON_TIME", 0.9) in stats.shares


def test_ranked_approaches_keep_record_order_with_intervals(replay_like):
    ranked = ranked_approaches(latest_all_time(load_outputs(replay_like))[A1])
    assert [r.approach_id for r in ranked] == ["lr=0.1", EVIL, "lr=0.3"]
    for r in ranked:
        assert 0.0 < r.low < r.success_mean < r.high < 1.0 and not r.exact


def test_truth_rows_regret_and_rank(replay_like):
    latest = latest_all_time(load_outputs(replay_like))
    truth = {
        "addresses": {
            A1: {
                "template_id": "t/v1",
                "best_approach": "lr=0.1",
                "effects": {"lr=0.1": 0.05, EVIL: 0.02, "lr=0.3": 0.0},
            },
            A2: {
                "template_id": "t/v1",
                "best_approach": "lr=0.1",
                "effects": {"lr=0.1": 0.05, EVIL: 0.02, "lr=0.3": 0.0},
            },
            "c3" * 32: {"template_id": "t/v1", "best_approach": "x", "effects": {"x": 0.1}},
        }
    }
    rows = {r.address: r for r in truth_rows(latest, truth)}
    assert rows[A1].match and rows[A1].regret == 0.0 and rows[A1].best_rank == 1
    assert not rows[A2].match and rows[A2].regret == pytest.approx(0.05)
    assert rows[A2].best_rank == 3
    assert rows["c3" * 32].recommended is None and rows["c3" * 32].regret is None
    points = truth_points(latest, truth)
    assert len(points) == 6  # three reported approaches of A1 and of A2; c3 reports none
    assert sum(p.recommended for p in points) == 2 and sum(p.true_best for p in points) == 2
    assert {(p.effect, p.recommended) for p in points if p.true_best} == {
        (0.05, True),
        (0.05, False),
    }


def test_no_outputs_is_one_clear_error(tmp_path):
    with pytest.raises(NoOutputs, match="no synthesis"):
        load_outputs(str(tmp_path))
    with pytest.raises(NoOutputs, match="not a directory"):
        load_outputs(str(tmp_path / "missing"))
    (tmp_path / "synthesis-00000-of-00001.jsonl").write_text("{broken\n")
    with pytest.raises(NoOutputs, match=":1: not JSON"):
        load_outputs(str(tmp_path))


def _referenced(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', html) + re.findall(
        r"(?:src|href)='([^'#][^']*)'", html
    )


def _assert_offline_page(page: str) -> str:
    html = open(page, encoding="utf-8").read()
    assert not re.search(r"https?:", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    folder = os.path.dirname(page)
    refs = _referenced(html)
    assert refs, "the page references no figure"
    for ref in refs:
        assert "/" not in ref and os.path.isfile(os.path.join(folder, ref)), ref
    return html


def _assert_png_drawn(path: str) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert min(pixels.shape) > 100
    assert (pixels < 200).mean() > 0.005  # ink, not a blank canvas


def test_report_page_and_figures(replay_like, tmp_path):
    truth = tmp_path / "truth.json"
    truth.write_text(
        json.dumps(
            {
                "addresses": {
                    A1: {
                        "template_id": "t/v1",
                        "best_approach": EVIL,
                        "effects": {EVIL: 0.1, "lr=0.1": 0.0},
                    }
                }
            }
        )
    )
    page = write_report(replay_like, truth_path=str(truth))
    assert page == os.path.join(replay_like, "report", "index.html")
    html = _assert_offline_page(page)
    figures = sorted(f for f in os.listdir(os.path.dirname(page)) if f.endswith(".png"))
    assert figures == [
        "fig-address-0.png",
        "fig-address-1.png",
        "fig-dead-letters.png",
        "fig-panes.png",
        "fig-truth.png",
    ]
    assert set(_referenced(html)) == set(figures)
    for name in figures:
        _assert_png_drawn(os.path.join(os.path.dirname(page), name))
    assert EVIL not in html and "&lt;script&gt;" in html  # ids are escaped
    assert "0 of 1 addresses recommend the true best" in html
    assert "LATE panes added 4 packets" in html
    assert re.search(r"too_late</td><td class=\"n\">2<", html)


def test_report_without_truth_or_panes_and_address_limit(tmp_path):
    records = [_record(f"{i:02x}" * 32, TOP, n=10 + i) for i in range(4)]
    records += [_record(f"{i:02x}" * 32, TOP, window=T0, n=10 + i) for i in range(4)]
    out = _write_outputs(tmp_path / "out", records)
    page = write_report(out, str(tmp_path / "rep"), max_addresses=2)
    html = _assert_offline_page(page)
    assert sorted(os.listdir(tmp_path / "rep")) == [
        "fig-address-0.png",
        "fig-address-1.png",
        "fig-dead-letters.png",
        "index.html",
    ]
    assert "No summary.json" in html and "A batch run" in html
    assert "first 2 drawn in detail" in html and html.count("<tr><td><a href='#a") == 2
    assert "03" * 16 in html  # the most packets first: address 03 is drawn


def test_accuracy_figure(tmp_path):
    path = accuracy_figure(str(tmp_path / "acc.png"), [(5, 1, 4), (50, 3, 4), (500, 0, 0)])
    _assert_png_drawn(path)


def test_cli_report_errors(tmp_path, replay_like, capsys):
    assert main(["report", "--output", str(tmp_path / "none")]) == 3
    assert main(["report", "--output", str(tmp_path)]) == 3
    assert main(["report", "--output", replay_like, "--truth", str(tmp_path / "no.json")]) == 2
    assert main(["report", "--output", replay_like, "--max-addresses", "0"]) == 2
    assert main(["report", "--output", replay_like, "--runner", "FnApiRunner"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("qis-beam report: ") for line in err)
    assert main(["report", "--output", replay_like, "--to", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "index.html")


# ------------------------------------------------------------------ whole pipeline, browser


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify(Array.from(document.images).map(
    i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]));
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed: apt-get install -y chromium (Debian)")


def _run_chromium(args: list[str], profile: str) -> str:
    command = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started
            proc.wait()
    return out


def _images_loaded(page: str, profile: str) -> dict[str, bool]:
    """{img src: loaded} as Chromium sees the page (a copy with a checking script)."""
    probe = os.path.join(os.path.dirname(page), "probe.html")
    html = open(page, encoding="utf-8").read().replace("</body>", CHECK_SCRIPT + "</body>")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(html)
    try:
        dom = _run_chromium(
            ["--virtual-time-budget=5000", "--dump-dom", "file://" + probe], profile
        )
    finally:
        os.remove(probe)
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-500:]
    return dict(json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")))


@pytest.fixture(scope="module")
def replayed_swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    swarm, out = str(root / "swarm"), str(root / "replay")
    assert (
        main(
            [
                "simulate",
                "--out",
                swarm,
                "--packets",
                "3000",
                "--nodes",
                "40",
                "--addresses",
                "5",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "replay",
                "--input",
                f"{swarm}/packets-*.tfrecord",
                "--output",
                out,
                "--node-registry",
                f"{swarm}/nodes.txt",
                "--early-firing-count",
                "20",
                "--runner",
                "BundleBasedDirectRunner",
            ]
        )
        == 0
    )
    return swarm, out


@pytest.mark.slow
def test_backfill_report_matches_its_outputs(tmp_path, capsys):
    swarm, out = str(tmp_path / "swarm"), str(tmp_path / "backfill")
    assert (
        main(
            [
                "simulate",
                "--out",
                swarm,
                "--packets",
                "3000",
                "--nodes",
                "40",
                "--addresses",
                "5",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "backfill",
                "--input",
                f"{swarm}/packets-*.tfrecord",
                "--output",
                out,
                "--node-registry",
                f"{swarm}/nodes.txt",
                "--runner",
                "FnApiRunner",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["report", "--output", out, "--truth", f"{swarm}/truth.json"]) == 0
    html = _assert_offline_page(capsys.readouterr().out.strip())
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert f'<td class="n">{summary["records_in"]}</td>' in html
    for reason, n in summary["dead_letters"]["by_reason"].items():
        if n:
            assert f'<td>{reason}</td><td class="n">{n}</td>' in html
    assert "A batch run" in html and html.count("<h3 id=") == 5


@pytest.mark.slow
def test_replay_report_renders_in_chromium(replayed_swarm, tmp_path):
    swarm, out = replayed_swarm
    page = write_report(out, str(tmp_path / "report"), os.path.join(swarm, "truth.json"))
    html = _assert_offline_page(page)
    assert "fig-panes.png" in html
    profile = str(tmp_path / "chromium-profile")
    loaded = _images_loaded(page, profile)
    assert len(loaded) == 8 and all(loaded.values()), loaded

    shot = str(tmp_path / "report.png")
    _run_chromium(
        ["--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", "file://" + page],
        profile,
    )
    _assert_png_drawn(shot)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)

    # The check can fail: a missing figure is reported as not loaded.
    os.remove(os.path.join(os.path.dirname(page), "fig-panes.png"))
    loaded = _images_loaded(page, profile)
    assert loaded["fig-panes.png"] is False and loaded["fig-truth.png"] is True


def test_report_package_is_beam_free():
    code = (
        "import sys, qis_beam.report; "
        "assert 'apache_beam' not in sys.modules and 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
