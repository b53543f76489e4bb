"""Regenerate a jar lock of ``pins.toml``.

    python -m qis_beam.stack.lock                     # prints the [kafka.jars] table
    python -m qis_beam.stack.lock flink_job_server    # prints [flink_job_server.jars]

Resolves the section's ``dependencies`` with Maven (as ``stack fetch`` does) and prints one
``"jar" = "sha256"`` line per jar; paste the output over the table after changing a version.
Review the diff: every new jar is code the stack will run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from qis_beam.stack.digests import sha256_of
from qis_beam.stack.maven import resolve_jars
from qis_beam.stack.pins import pins

LOCKED = ("kafka", "flink_job_server")


def lock_table(section: str, dependencies: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="qis-lock.") as tmp:
        jars = resolve_jars(section, dependencies, Path(tmp))
        lines = [f"[{section}.jars]"] + [f'"{jar.name}" = "{sha256_of(jar)}"' for jar in jars]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    section = args[0] if args else "kafka"
    if section not in LOCKED:
        print(f"usage: python -m qis_beam.stack.lock [{'|'.join(LOCKED)}]", file=sys.stderr)
        return 2
    sys.stdout.write(lock_table(section, pins()[section]["dependencies"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
