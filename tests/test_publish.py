"""Write aside, commit, publish by renames (qis_beam.publish), without a pipeline."""

from __future__ import annotations

import json
import os

from qis_beam.publish import COMMIT, apply, commit, new_run_dir, published_outputs, recover


def write(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def contents(directory) -> dict[str, str]:
    return {
        name: open(os.path.join(directory, name)).read()
        for name in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, name))
    }


def previous_run(output) -> dict[str, str]:
    os.makedirs(output)
    write(os.path.join(output, "synthesis-00000-of-00002.jsonl"), "old0\n")
    write(os.path.join(output, "synthesis-00001-of-00002.jsonl"), "old1\n")
    write(os.path.join(output, "dead_letters-00000-of-00001.jsonl"), "olddead\n")
    write(os.path.join(output, "summary.json"), "{}")
    write(os.path.join(output, "intelligence.db"), "old store")
    return contents(output)


def staged_run(output, committed: bool) -> str:
    run_dir = new_run_dir(output)
    write(os.path.join(run_dir, "synthesis-00000-of-00001.jsonl"), "new\n")
    write(os.path.join(run_dir, "summary.json"), '{"new": 1}')
    write(os.path.join(run_dir, "intelligence.db"), "new store")
    os.makedirs(os.path.join(run_dir, "beam-temp-synthesis-123"))
    if committed:
        names = [p.rsplit("/", 1)[-1] for p in published_outputs(run_dir)]
        commit(run_dir, {"files": names, "store": "copy", "run_id": "r1"})
    return run_dir


NEW = {
    "intelligence.db": "new store",
    "summary.json": '{"new": 1}',
    "synthesis-00000-of-00001.jsonl": "new\n",
}


def test_uncommitted_runs_and_beam_temp_are_debris(tmp_path):
    output = str(tmp_path / "out")
    before = previous_run(output)
    staged_run(output, committed=False)
    os.makedirs(os.path.join(output, "beam-temp-dead_letters-9"))
    assert len(recover(output)) == 2
    assert sorted(os.listdir(output)) == sorted(before)
    assert contents(output) == before


def test_a_committed_run_replaces_every_previous_output(tmp_path):
    output = str(tmp_path / "out")
    previous_run(output)
    run_dir = staged_run(output, committed=True)
    with open(os.path.join(run_dir, COMMIT)) as f:
        assert json.load(f)["files"] == ["synthesis-00000-of-00001.jsonl", "summary.json"]
    apply(output, run_dir)
    assert contents(output) == NEW
    assert sorted(os.listdir(output)) == sorted(NEW)  # no run folder, no stale shard


def test_publishing_resumes_after_a_crash_half_way(tmp_path):
    output = str(tmp_path / "out")
    previous_run(output)
    run_dir = staged_run(output, committed=True)
    # A crash after the first rename: one new file in place, the rest still staged.
    os.replace(
        os.path.join(run_dir, "synthesis-00000-of-00001.jsonl"),
        os.path.join(output, "synthesis-00000-of-00001.jsonl"),
    )
    assert recover(output) == [f"published committed run {run_dir}"]
    assert contents(output) == NEW
    assert recover(output) == []  # nothing left to do
