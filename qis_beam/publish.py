"""Runs that survive crashes: write aside, commit with one marker, publish by renames.

A bounded run writes everything (JSON Lines shards, summary, the default SQLite store) into
``DIR/_run-<id>/``, a folder beside the outputs it will replace. When the run is complete it
writes ``COMMIT.json`` there (the commit point, one atomic object), then publishes: renames
its files over ``DIR``'s, deletes the previous run's files it does not replace, renames the
store copy over ``DIR/intelligence.db``, loads an external store (``--store URL``, an
idempotent upsert) and removes the folder.

Killed at any moment before the commit, a run has not touched ``DIR``'s outputs or the store;
its folder is debris the next run removes (with any ``beam-temp-*`` folder). Killed after the
commit, it is complete: the next run (or :func:`recover`) finishes publishing it first. Only
one run may write to an output folder at a time.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems

RUN_PREFIX = "_run-"
COMMIT = "COMMIT.json"
BEAM_TEMP = "beam-temp-"
# Published output names (any shards of these prefixes, and these files).
OUTPUT_PATTERNS = ("synthesis-*.jsonl", "dead_letters-*.jsonl", "tallies-*.jsonl")
OUTPUT_FILES = ("summary.json",)
STORE_NAME = "intelligence.db"


def new_run_dir(output_dir: str) -> str:
    name = f"{RUN_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    path = FileSystems.join(output_dir, name)
    FileSystems.mkdirs(path)
    return path


def _match(pattern: str) -> list[str]:
    try:
        return sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    except Exception:  # noqa: BLE001 - nothing to match (e.g. the folder does not exist)
        return []


def _children(directory: str, prefix: str) -> list[str]:
    """Entries (files or folders) of ``directory`` whose name starts with ``prefix``."""
    if FileSystems.get_scheme(directory) in (None, "file"):
        if not os.path.isdir(directory):
            return []
        return sorted(
            os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)
        )
    # Object stores have no folders: the distinct first path component under the prefix.
    names = set()
    base = directory.rstrip("/") + "/"
    for path in _match(base + prefix + "*"):
        names.add(base + path[len(base) :].split("/", 1)[0])
    return sorted(names)


def published_outputs(directory: str) -> list[str]:
    """Output files of a run in ``directory`` (the folder a run publishes to, or a run's own)."""
    found = [p for pattern in OUTPUT_PATTERNS for p in _match(FileSystems.join(directory, pattern))]
    found += [FileSystems.join(directory, n) for n in OUTPUT_FILES]
    return [p for p in found if FileSystems.exists(p)]


def _delete(paths: list[str]) -> None:
    paths = [p for p in paths if FileSystems.exists(p)]
    if paths:
        FileSystems.delete(paths)


def _delete_tree(path: str) -> None:
    """A folder and everything in it (object stores: every object under the prefix)."""
    if FileSystems.get_scheme(path) in (None, "file"):
        _delete([path])
    else:
        try:
            FileSystems.delete([path.rstrip("/") + "/"])
        except Exception:  # noqa: BLE001 - already gone
            pass


def _replace(source: str, target: str) -> None:
    if FileSystems.get_scheme(target) in (None, "file"):
        os.replace(source, target)  # atomic on one filesystem
    else:  # object stores: copy then delete; the commit marker makes this repeatable
        _delete([target])
        FileSystems.rename([source], [target])


def pause_point(name: str) -> None:
    """Test hook for the crash tests: with ``QIS_PAUSE_AT=<name>`` the process says where it
    is (``<QIS_PAUSE_AT_FILE>``) and waits there to be killed (``kill -9``) from outside."""
    if os.environ.get("QIS_PAUSE_AT") != name:
        return
    with open(os.environ["QIS_PAUSE_AT_FILE"], "w") as f:
        f.write(name)
    while True:  # pragma: no cover - ended by SIGKILL
        signal.pause()


def commit(run_dir: str, manifest: dict) -> None:
    """The commit point: the run is complete once ``COMMIT.json`` exists."""
    path = FileSystems.join(run_dir, COMMIT)
    data = json.dumps(manifest, sort_keys=True).encode("utf-8")
    if FileSystems.get_scheme(path) in (None, "file"):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic
    else:
        with FileSystems.create(path) as f:  # an object appears whole or not at all
            f.write(data)


def apply(
    output_dir: str, run_dir: str, load_external: Callable[[dict], None] | None = None
) -> None:
    """Publish a committed run (idempotent: safe to repeat after a crash half-way)."""
    with FileSystems.open(FileSystems.join(run_dir, COMMIT)) as f:
        manifest = json.loads(f.read().decode("utf-8"))
    new_names = manifest["files"]
    sources, targets = [], []
    for name in new_names:
        source = FileSystems.join(run_dir, name)
        if FileSystems.exists(source):  # not yet moved by an earlier attempt
            sources.append(source)
            targets.append(FileSystems.join(output_dir, name))
    for source, target in zip(sources, targets, strict=True):
        _replace(source, target)
        pause_point("mid-publish")
    keep = {FileSystems.join(output_dir, n) for n in new_names}
    _delete([p for p in published_outputs(output_dir) if p not in keep])
    store_copy = FileSystems.join(run_dir, STORE_NAME)
    if manifest.get("store") == "copy" and FileSystems.exists(store_copy):
        # Readers see the old or the new store, never a half-loaded one.
        _replace(store_copy, FileSystems.join(output_dir, STORE_NAME))
    if manifest.get("store") == "external" and load_external is not None:
        load_external(manifest)
    _delete_tree(run_dir)


def recover(output_dir: str, load_external: Callable[[dict], None] | None = None) -> list[str]:
    """Before a run: finish publishing committed runs, remove everything else a crash left
    (uncommitted run folders, ``beam-temp-*``). Returns what was done, for the log."""
    done = []
    for run_dir in _children(output_dir, RUN_PREFIX):
        if FileSystems.exists(FileSystems.join(run_dir, COMMIT)):
            apply(output_dir, run_dir, load_external)
            done.append(f"published committed run {run_dir}")
        else:
            _delete_tree(run_dir)
            done.append(f"removed incomplete run {run_dir}")
    for temp in _children(output_dir, BEAM_TEMP):
        _delete_tree(temp)
        done.append(f"removed {temp}")
    return done
