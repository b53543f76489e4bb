"""The report's HTML: one page, inline CSS, figures as PNG files beside it (relative links).

Self-contained by construction: no script, font or stylesheet is fetched from anywhere, so the
folder can be copied, zipped or opened offline. Every value from the outputs is escaped
(approach ids and template ids come from the swarm's packets).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from qis_beam.report.intervals import CREDIBLE_LEVEL
from qis_beam.report.load import PaneStats, RankedApproach, TruthRow

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem auto;max-width:1200px;
color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #e2e2e2;padding:.2rem .5rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
.muted{color:#666;font-size:.85rem}.ok{color:#2d7a47;font-weight:600}.bad{color:#b03a2e;font-weight:600}
code{background:#f3f3f3;padding:0 .2rem}
"""


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int] = frozenset()
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def img(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def _f(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value if round(value, digits) else 0.0:.{digits}f}"  # no "-0.000"


def summary_section(summary: dict[str, Any] | None, output_dir: str) -> str:
    if summary is None:
        return f"<p class='muted'>No summary.json in {escape(output_dir)}: run totals unknown.</p>"
    dead = summary.get("dead_letters") or {}
    balanced = summary.get("balanced")
    balance = (
        "<span class='ok'>balances</span>"
        if balanced
        else "<span class='bad'>DOES NOT BALANCE</span>"
        if balanced is not None
        else "–"
    )
    rows = [
        ("records_in", summary.get("records_in")),
        ("valid", summary.get("valid")),
        ("duplicates", summary.get("duplicates")),
        ("dead_letters", dead.get("total")),
        ("records_in = valid + duplicates + dead_letters", balance),
        ("too_late (valid, missed their window)", summary.get("too_late")),
        ("addresses", summary.get("addresses")),
        ("windows", summary.get("windows")),
        ("runner", escape(str(summary.get("runner")))),
        ("wall time (s)", summary.get("wall_time_s")),
    ]
    return table(("run", ""), ((escape(k), v) for k, v in rows), numeric={1})


def truth_section(rows: Sequence[TruthRow], figure: str) -> str:
    hits = sum(r.match for r in rows)
    recommended = sum(r.recommended is not None for r in rows)
    rows_html = table(
        ("address", "template", "recommended", "true best", "match", "regret", "true best's rank"),
        (
            (
                f"<code>{escape(r.address[:16])}…</code>",
                escape(r.template_id),
                escape(r.recommended or "–"),
                escape(r.true_best),
                "<span class='ok'>yes</span>" if r.match else "<span class='bad'>no</span>",
                _f(r.regret, 4),
                r.best_rank or "not reported",
            )
            for r in rows
        ),
        numeric={5, 6},
    )
    return (
        f"<p>{hits} of {len(rows)} addresses recommend the true best approach "
        f"({recommended} have a recommendation). Regret is the true effect of the best approach "
        f"minus that of the recommended one, from the simulator's truth.json.</p>"
        + img(figure, "recommended vs true best")
        + rows_html
    )


def panes_section(stats: PaneStats, figure: str | None) -> str:
    counts = ", ".join(f"{t} {n}" for t, n in stats.counts.items() if n or t != "UNKNOWN")
    text = (
        f"<p>Windowed records: {counts}; {stats.windows} windows, {stats.multi_pane_windows} with "
        f"more than one pane; {stats.snapshots} all-time snapshots.</p>"
    )
    if figure is None:
        return text + (
            "<p class='muted'>A batch run: one ON_TIME pane per window, so there are no pane "
            "timings to show (run <code>qis-beam replay</code> for early and late panes).</p>"
        )
    return text + (
        f"<p>LATE panes added {stats.late_packets} packets after the ON_TIME panes. The right "
        "panel shows, for every pane, the share of its window's final packet count it already "
        "held (accumulating panes). The outputs carry each pane's timing and index but no "
        "processing time, so pane delays in wall-clock time are not shown.</p>"
        + img(figure, "pane timings")
    )


def dead_letters_section(counts: dict[str, int], figure: str) -> str:
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return img(figure, "dead letters by reason") + table(
        ("reason", "records"), ((escape(k), v) for k, v in rows), numeric={1}
    )


def overview_table(entries: Sequence[tuple[str, dict[str, Any], str | None]]) -> str:
    """(address, all-time record, anchor or None) -> one row each."""
    rows = []
    for address, record, anchor in entries:
        short = escape(address[:16]) + "…"
        link = f"<a href='#{anchor}'>{short}</a>" if anchor else short
        if record.get("suppressed"):
            rows.append(
                (
                    link,
                    escape(record.get("template_id", "")),
                    record["n_packets"],
                    record["n_nodes"],
                    "suppressed (n_nodes &lt; --min-nodes)",
                    "–",
                )
            )
            continue
        top = (record.get("approaches") or [{}])[0]
        rows.append(
            (
                link,
                escape(record.get("template_id") or ""),
                record["n_packets"],
                record["n_nodes"],
                escape(record.get("recommended_approach") or "–"),
                _f(top.get("success_mean")),
            )
        )
    return table(
        ("address", "template", "packets", "nodes", "recommended", "success_mean"),
        rows,
        numeric={2, 3, 5},
    )


def address_section(
    anchor: str,
    address: str,
    record: dict[str, Any],
    ranked: Sequence[RankedApproach],
    figure: str,
    true_best: str | None,
) -> str:
    exact = all(r.exact for r in ranked)
    rows_html = table(
        (
            "rank",
            "approach",
            "packets",
            "nodes",
            "success_mean",
            f"{CREDIBLE_LEVEL:.0%} interval",
            "mean_delta",
        )
        + (("true best",) if true_best else ()),
        (
            (
                r.rank,
                escape(r.approach_id),
                r.n_packets,
                r.n_nodes,
                _f(r.success_mean),
                f"{_f(r.low)} – {_f(r.high)}",
                _f(r.mean_delta, 4),
            )
            + (("★" if r.approach_id == true_best else "",) if true_best else ())
            for r in ranked
        ),
        numeric={0, 2, 3, 4, 6},
    )
    note = (
        ""
        if exact or not ranked
        else (
            "<p class='muted'>Interval widths estimated (the records carry no per-approach "
            "alpha/beta): see <a href='#method'>method</a>.</p>"
        )
    )
    return (
        f"<h3 id='{anchor}'>{escape(record.get('template_id') or '')} "
        f"<code>{escape(address)}</code></h3>"
        f"<p class='muted'>{record['n_packets']} packets from {record['n_nodes']} nodes; address "
        f"success_mean {_f(record.get('success_mean'))} "
        f"(alpha {_f(record.get('success_alpha'), 2)}, beta {_f(record.get('success_beta'), 2)}); "
        f"mean_delta {_f(record.get('mean_delta'), 4)}.</p>"
        + img(figure, f"approaches of {address}")
        + rows_html
        + note
    )


METHOD = f"""
<h2 id="method">Method</h2>
<ul class="muted">
<li>Each approach's posterior of success is Beta(alpha, beta) with alpha = 1 + Σ w·s and
beta = 1 + Σ w·(1 − s) over its non-OPEN packets (spec section 5); the interval is the central
{CREDIBLE_LEVEL:.0%} one, from exact Beta quantiles (regularized incomplete beta, bisection).</li>
<li>When the approach rows carry no success_alpha/success_beta (the section-5 record has only
success_mean and total_weight, which also counts OPEN packets), the non-OPEN weight S of an
approach is estimated as its total_weight × the address's non-OPEN share
((success_alpha + success_beta − 2) / total_weight), clamped so that S ≤ total_weight and
alpha, beta ≥ 1; then alpha = success_mean·(2 + S), beta = (1 − success_mean)·(2 + S), which
keeps the reported success_mean exact. Approaches with more OPEN packets than the address
average get intervals that are somewhat too narrow, ones with fewer somewhat too wide.</li>
<li>All-time figures use each address's newest all-time record; the per-window lines use the
last pane of each window, with the approach's all-time value dashed. A window reports only
approaches with at least --min-support packets in it, cut to --top-k: gaps in a line are
windows where the approach was not reported. A window holds fewer packets than all time, so
the uniform prior pulls its success_mean further toward 0.5.</li>
</ul>
"""


def render_page(title: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """sections: (anchor, heading, html body)."""
    nav = " · ".join(f"<a href='#{a}'>{escape(h)}</a>" for a, h, _ in sections)
    body = "".join(f"<h2 id='{a}'>{escape(h)}</h2>{html}" for a, h, html in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class='muted'>{nav} · <a href='#method'>Method</a></p>"
        f"{body}{METHOD}</body></html>\n"
    )
