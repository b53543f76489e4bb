"""Maven, used as a resolver: the runtime closure of some coordinates, and a shaded jar of it.

Maven runs with ``-C`` (fail on a checksum that differs from the repository's), and every jar
it returns is then compared with the SHA-256 lock in ``pins.toml`` by the caller: the lock,
not the repository, decides what runs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


class MavenError(Exception):
    """Maven failed or is missing; the message is one line."""


def _dependency(coordinate: str) -> str:
    group, artifact, version = coordinate.split(":")
    return (
        f"<dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version></dependency>"
    )


def pom(name: str, dependencies: list[str], build: str = "", packaging: str = "pom") -> str:
    """A throwaway pom whose runtime dependency closure is what we want."""
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        f"<groupId>qis-beam</groupId><artifactId>{name}</artifactId><version>1</version>"
        f"<packaging>{packaging}</packaging>"
        "<properties><project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>"
        "</properties><dependencies>"
        + "".join(_dependency(c) for c in dependencies)
        + f"</dependencies>{build}</project>"
    )


def shade_build(plugin: str, main_class: str, final_name: str) -> str:
    """The <build> of a pom that shades its dependencies into one runnable jar.

    Service files are merged (Beam finds its runners, coders and transform registrars
    through ``META-INF/services``) and signatures dropped (they no longer match).
    """
    group, artifact, version = plugin.split(":")
    shade = "org.apache.maven.plugins.shade.resource"
    return (
        f"<build><finalName>{final_name}</finalName><plugins><plugin>"
        f"<groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>"
        "<executions><execution><phase>package</phase><goals><goal>shade</goal></goals>"
        "<configuration><createDependencyReducedPom>false</createDependencyReducedPom>"
        "<filters><filter><artifact>*:*</artifact><excludes>"
        "<exclude>META-INF/*.SF</exclude><exclude>META-INF/*.DSA</exclude>"
        "<exclude>META-INF/*.RSA</exclude></excludes></filter></filters><transformers>"
        f'<transformer implementation="{shade}.ServicesResourceTransformer"/>'
        f'<transformer implementation="{shade}.ManifestResourceTransformer">'
        f"<mainClass>{main_class}</mainClass></transformer>"
        "</transformers></configuration></execution></executions></plugin></plugins></build>"
    )


def _mvn(label: str, goals: list[str], pom_text: str, work: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MavenError(f"{label} needs Maven: `mvn` is not on PATH (apt-get install maven)")
    (work / "pom.xml").write_text(pom_text)
    command = [mvn, "-B", "-q", "-C", *goals]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        errors = (
            [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
            or (result.stdout + result.stderr).strip().splitlines()[-1:]
            or ["?"]
        )
        raise MavenError(f"{label}: mvn {' '.join(goals[:1])} failed: {errors[0].strip()}")


def resolve_jars(label: str, dependencies: list[str], out: Path) -> list[Path]:
    """Copy the runtime closure of ``dependencies`` into ``out`` (through ``~/.m2``)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qis-maven.") as work:
        goals = [
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={out}",
        ]
        _mvn(label, goals, pom("resolve", dependencies), Path(work))
    return sorted(out.glob("*.jar"))


def resolve_and_shade(
    label: str, dependencies: list[str], plugin: str, main_class: str, lib: Path, jar: Path
) -> list[Path]:
    """Copy the runtime closure into ``lib`` and shade the same closure into ``jar``.

    One Maven run does both, so the shaded classes come from exactly the files copied to
    ``lib``, which the caller checks against its lock before it publishes ``jar``.
    """
    lib.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qis-maven.") as work:
        name = jar.stem
        build = shade_build(plugin, main_class, name)
        goals = [
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={lib}",
            "package",
        ]
        _mvn(label, goals, pom(name, dependencies, build, packaging="jar"), Path(work))
        shutil.move(str(Path(work) / "target" / f"{name}.jar"), jar)
    return sorted(lib.glob("*.jar"))
