"""``qis-beam report``: an offline HTML page with PNG figures from a run's output folder.

    write_report("out/backfill", truth_path="swarm/truth.json")  # -> out/backfill/report/index.html

The page (``index.html``) and its figures (``fig-*.png``) are written side by side into one
folder, linked relatively: copy or zip the folder and it still works, with no network.
Beam-free: it reads the JSON Lines and summary.json a run wrote (:mod:`qis_beam.report.load`).
"""

from __future__ import annotations

import glob
import os

from qis_beam.report import figures, page
from qis_beam.report.load import (
    BadTruth,
    NoOutputs,
    dead_letter_counts,
    final_windows,
    latest_all_time,
    load_outputs,
    load_truth,
    pane_stats,
    ranked_approaches,
    truth_points,
    truth_rows,
)

__all__ = ["BadTruth", "NoOutputs", "write_report", "DEFAULT_MAX_ADDRESSES", "PAGE_NAME"]

PAGE_NAME = "index.html"
DEFAULT_MAX_ADDRESSES = 50  # addresses drawn in detail (most packets first); all are in the table


def write_report(
    output_dir: str,
    to_dir: str | None = None,
    truth_path: str | None = None,
    *,
    max_addresses: int = DEFAULT_MAX_ADDRESSES,
    top_n: int = 3,
) -> str:
    """Write the report for ``output_dir`` into ``to_dir`` (default ``output_dir/report``);
    returns the page's path. Raises :class:`NoOutputs` for a folder without run outputs."""
    truth = load_truth(truth_path) if truth_path else None  # a bad --truth fails first
    outputs = load_outputs(output_dir)
    to_dir = to_dir or os.path.join(output_dir, "report")
    os.makedirs(to_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(to_dir, "fig-*.png")):  # a previous report's figures
        os.remove(stale)

    def fig(name: str) -> tuple[str, str]:
        return os.path.join(to_dir, name), name

    latest = latest_all_time(outputs)
    windows = final_windows(outputs)
    sections = [("run", "Run", page.summary_section(outputs.summary, output_dir))]

    tr = truth_rows(latest, truth) if truth else []
    best = {r.address: r.true_best for r in tr}
    if truth:
        path, name = fig("fig-truth.png")
        figures.truth_figure(path, tr, truth_points(latest, truth))
        sections.append(("truth", "Recommended vs true best", page.truth_section(tr, name)))

    path, name = fig("fig-dead-letters.png")
    counts = dead_letter_counts(outputs)
    figures.dead_letters_figure(path, dict(counts))
    sections.append(("dead-letters", "Dead letters", page.dead_letters_section(counts, name)))

    stats = pane_stats(outputs)
    pane_fig = None
    if stats.streaming:
        path, pane_fig = fig("fig-panes.png")
        figures.panes_figure(path, stats)
    sections.append(("panes", "Panes", page.panes_section(stats, pane_fig)))

    # Addresses seen only in windows (no all-time record) still get a row, from their last window.
    for address, rows in windows.items():
        latest.setdefault(address, rows[-1])
    order = sorted(latest, key=lambda a: (-latest[a].get("n_packets", 0), a))
    detailed = [a for a in order if not latest[a].get("suppressed")][:max_addresses]
    anchors = {a: f"a{i}" for i, a in enumerate(detailed)}
    blocks = []
    for address in detailed:
        record = latest[address]
        ranked = ranked_approaches(record)
        path, name = fig(f"fig-address-{anchors[address][1:]}.png")
        title = f"{record.get('template_id') or ''}  {address[:16]}…"
        figures.address_figure(
            path, title, ranked, windows.get(address, []), top_n=top_n, true_best=best.get(address)
        )
        blocks.append(
            page.address_section(anchors[address], address, record, ranked, name, best.get(address))
        )
    more = len(order) - len(detailed)
    intro = (
        f"<p>{len(order)} addresses, most packets first"
        + (f"; the first {len(detailed)} drawn in detail (--max-addresses)" if more else "")
        + ".</p>"
    )
    overview = page.overview_table([(a, latest[a], anchors.get(a)) for a in order])
    sections.append(("addresses", "Addresses", intro + overview + "".join(blocks)))

    html = page.render_page(f"qis-beam report: {os.path.abspath(output_dir)}", sections)
    page_path = os.path.join(to_dir, PAGE_NAME)
    with open(page_path, "w", encoding="utf-8") as handle:
        handle.write(html)
    return page_path
