"""The report's PNG figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: nothing here touches matplotlib's global backend or figure registry, so the
report can run inside any process (a notebook, a test, the demo) without side effects.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from qis_beam.report.intervals import CREDIBLE_LEVEL
from qis_beam.report.load import PaneStats, RankedApproach, TruthPoint, TruthRow

DPI = 100
TIMING_COLORS = {"EARLY": "#8fb8de", "ON_TIME": "#2e6fad", "LATE": "#d9822b", "UNKNOWN": "#999999"}
LINE_COLORS = ("#2e6fad", "#d9822b", "#3a9a5b", "#9b59b6", "#c0392b")
MATCH, MISS, NONE = "#3a9a5b", "#c0392b", "#bbbbbb"


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).replace(tzinfo=None)


def address_figure(
    path: str,
    title: str,
    ranked: Sequence[RankedApproach],
    windows: Sequence[dict],
    *,
    top_n: int = 3,
    true_best: str | None = None,
) -> str:
    """Left: the ranked approaches with credible intervals; right: success_mean per window
    (last pane of each) for the top ``top_n`` approaches, over the packets per window."""
    fig = _new(12, max(3.2, 1.2 + 0.36 * len(ranked)))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.15])
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")

    if ranked:
        y = np.arange(len(ranked))[::-1]
        means = np.array([r.success_mean for r in ranked])
        lows = [r.low for r in ranked]
        highs = [r.high for r in ranked]
        colors = [LINE_COLORS[0] if r.rank == 1 else "#555555" for r in ranked]
        left.hlines(y, lows, highs, colors=colors, lw=2)
        left.scatter(lows + highs, np.concatenate([y, y]), marker="|", s=60, c=colors + colors)
        left.scatter(means, y, c=colors, zorder=3, s=28)
        if true_best is not None:
            for yi, r in zip(y, ranked, strict=True):
                if r.approach_id == true_best:
                    left.scatter(
                        [r.high + 0.03],
                        [yi],
                        marker="*",
                        s=110,
                        color=MATCH,
                        zorder=4,
                        label="true best",
                    )
                    left.legend(loc="lower right", fontsize=8, frameon=False)
        left.set_yticks(y, [f"{r.rank}. {r.approach_id}" for r in ranked], fontsize=8)
        left.set_xlim(0, 1.05)
        left.axvline(0.5, color="#dddddd", lw=1, zorder=0)
        exact = all(r.exact for r in ranked)
        left.set_xlabel(
            f"success_mean, {CREDIBLE_LEVEL:.0%} credible interval"
            + ("" if exact else " (width estimated)"),
            fontsize=9,
        )
        left.set_title("all-time ranking", fontsize=10)
    else:
        _empty(left, "no approach with --min-support packets")

    top = [r.approach_id for r in ranked[:top_n]]
    if windows and top:
        starts = [_utc(w["window_start_ms"]) for w in windows]
        bars = right.twinx()
        width = (windows[0]["window_end_ms"] - windows[0]["window_start_ms"]) / 86_400_000
        bars.bar(
            starts,
            [w["n_packets"] for w in windows],
            width=width * 0.9,
            align="edge",
            color="#eeeeee",
            zorder=0,
        )
        bars.set_ylabel("packets per window", fontsize=8, color="#888888")
        bars.tick_params(labelsize=7, colors="#888888")
        right.set_zorder(bars.get_zorder() + 1)
        right.patch.set_visible(False)
        mids = [_utc((w["window_start_ms"] + w["window_end_ms"]) // 2) for w in windows]
        for color, approach in zip(LINE_COLORS, top, strict=False):
            values = []
            for w in windows:
                rows = [a for a in w.get("approaches") or [] if a["approach_id"] == approach]
                values.append(rows[0]["success_mean"] if rows else math.nan)
            right.plot(mids, values, marker="o", ms=3.5, lw=1.4, color=color, label=approach)
            all_time = next(r.success_mean for r in ranked if r.approach_id == approach)
            right.axhline(all_time, color=color, lw=1, ls="--", alpha=0.6)
        locator = AutoDateLocator()
        right.xaxis.set_major_locator(locator)
        right.xaxis.set_major_formatter(ConciseDateFormatter(locator, show_offset=False))
        first, last = _utc(windows[0]["window_start_ms"]), _utc(windows[-1]["window_end_ms"])
        span = f"{first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC"
        right.set_xlabel(f"window ({span})", fontsize=8)
        right.tick_params(labelsize=7)
        right.set_ylim(0, 1)
        right.set_ylabel("success_mean in the window", fontsize=8)
        right.set_title(
            f"top {len(top)} per window; dashed: all-time value",
            fontsize=10,
        )
        right.legend(loc="lower left", fontsize=7, frameon=False, ncol=len(top))
    else:
        _empty(right, "no windowed records")
    return _save(fig, path)


def dead_letters_figure(path: str, counts: dict[str, int]) -> str:
    fig = _new(7, max(2.2, 0.8 + 0.32 * len(counts)))
    ax = fig.subplots()
    if counts:
        items = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))
        names = [k for k, _ in items]
        values = [v for _, v in items]
        colors = ["#d9822b" if k == "too_late" else "#c0392b" for k in names]
        ax.barh(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.15)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("records (too_late: valid packets that missed their window)", fontsize=8)
    else:
        _empty(ax, "no dead letters")
    ax.set_title("dead letters by reason", fontsize=10)
    return _save(fig, path)


def panes_figure(path: str, stats: PaneStats) -> str:
    """Left: windowed panes by timing; right: share of each window's final packets a pane had."""
    fig = _new(10, 3.2)
    left, right = fig.subplots(1, 2)
    timings = [t for t, n in stats.counts.items() if n or t != "UNKNOWN"]
    left.bar(timings, [stats.counts[t] for t in timings], color=[TIMING_COLORS[t] for t in timings])
    for i, t in enumerate(timings):
        left.text(i, stats.counts[t], str(stats.counts[t]), ha="center", va="bottom", fontsize=8)
    left.set_title(f"windowed panes by timing ({stats.snapshots} all-time snapshots)", fontsize=10)
    left.tick_params(labelsize=8)
    if stats.shares:
        rng = np.random.default_rng(0)  # fixed jitter: the same outputs give the same picture
        for i, t in enumerate(timings):
            shares = [s for timing, s in stats.shares if timing == t]
            if shares:
                x = i + rng.uniform(-0.25, 0.25, len(shares))
                right.scatter(x, shares, s=8, alpha=0.5, color=TIMING_COLORS[t])
        right.set_xticks(range(len(timings)), timings, fontsize=8)
        right.set_ylim(0, 1.05)
        right.set_ylabel("packets in pane / in last pane", fontsize=8)
        right.set_title("share of the window's final packets in each pane", fontsize=10)
    else:
        _empty(right, "no windowed panes")
    return _save(fig, path)


def truth_figure(path: str, rows: Sequence[TruthRow], points: Sequence[TruthPoint]) -> str:
    """Left: per address, the regret of its recommendation; right: every reported approach's
    success_mean against its true effect, the recommended and the true best marked."""
    fig = _new(12, max(3.4, 0.9 + 0.22 * len(rows)))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    hits = sum(r.match for r in rows)
    fig.suptitle(f"recommended vs true best: {hits}/{len(rows)} addresses match", fontsize=11)

    y = np.arange(len(rows))[::-1]
    regrets = [r.regret or 0.0 for r in rows]
    colors = [NONE if r.recommended is None else MATCH if r.match else MISS for r in rows]
    left.barh(y, regrets, color=colors)
    for yi, r in zip(y, rows, strict=True):
        text = "match" if r.match else r.recommended or "no recommendation"
        left.text(max(r.regret or 0.0, 0.0), yi, f"  {text}", va="center", fontsize=7)
    left.set_yticks(y, [f"{r.template_id} {r.address[:8]}" for r in rows], fontsize=7)
    left.set_xlim(0, max(regrets + [0.01]) * 1.8)
    left.tick_params(axis="x", labelsize=7)
    left.set_xlabel("regret: true effect of the best minus the recommended's", fontsize=8)

    if points:
        others = [p for p in points if not p.recommended]
        chosen = [p for p in points if p.recommended]
        best = [p for p in points if p.true_best]
        right.scatter(
            [p.effect for p in others],
            [p.success_mean for p in others],
            s=10,
            color="#999999",
            alpha=0.6,
            label="reported approach",
        )
        right.scatter(
            [p.effect for p in chosen],
            [p.success_mean for p in chosen],
            s=26,
            color=LINE_COLORS[0],
            label="recommended",
        )
        right.scatter(
            [p.effect for p in best],
            [p.success_mean for p in best],
            s=140,
            marker="*",
            facecolors="none",
            edgecolors=MATCH,
            linewidths=1.2,
            label="true best",
        )
        right.set_ylim(0, 1)
        right.legend(loc="upper left", fontsize=7, frameon=False)
        right.tick_params(labelsize=7)
    else:
        _empty(right, "no reported approach has a true effect in truth.json")
    right.set_xlabel("true effect (truth.json)", fontsize=8)
    right.set_ylabel("all-time success_mean", fontsize=8)
    right.set_title("every reported approach of every address", fontsize=10)
    return _save(fig, path)


def accuracy_figure(path: str, points: Sequence[tuple[int, int, int]], subtitle: str = "") -> str:
    """(nodes, matching, with a recommendation) per swarm size -> the accuracy curve."""
    fig = _new(7, 3.6)
    ax = fig.subplots()
    nodes = [n for n, _, _ in points]
    share = [100 * h / t if t else math.nan for _, h, t in points]
    ax.plot(nodes, share, marker="o", color=LINE_COLORS[0])
    for n, s, (_, h, t) in zip(nodes, share, points, strict=True):
        if t:
            ax.annotate(
                f"{h}/{t}",
                (n, s),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xticks(nodes, [str(n) for n in nodes])
    ax.minorticks_off()  # log-axis minor labels (6x10^0 ...) clutter a few-point curve
    ax.set_ylim(-4, 108)
    ax.set_xlabel("nodes in the swarm", fontsize=9)
    ax.set_ylabel("recommendations = true best (%)", fontsize=9)
    ax.set_title(
        "recommendation accuracy by swarm size" + (f"\n{subtitle}" if subtitle else ""), fontsize=10
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)
