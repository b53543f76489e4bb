"""Regenerate the Kafka jar lock of ``pins.toml``.

    python -m qis_beam.stack.lock            # prints the [kafka.jars] table

Resolves ``[kafka].dependencies`` with Maven (as ``stack fetch`` does) and prints one
``"jar" = "sha256"`` line per jar; paste the output over the ``[kafka.jars]`` table after
changing the Kafka version. Review the diff: every new jar is code the broker will run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from qis_beam.stack.digests import sha256_of
from qis_beam.stack.fetch import resolve_kafka_jars
from qis_beam.stack.pins import pins


def lock_table(dependencies: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="qis-kafka-lock.") as tmp:
        jars = resolve_kafka_jars(dependencies, Path(tmp))
        lines = ["[kafka.jars]"] + [f'"{jar.name}" = "{sha256_of(jar)}"' for jar in jars]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(lock_table(pins()["kafka"]["dependencies"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
