"""Packaging for qis-beam.

The protobuf wire contract in ``protos/`` is compiled with grpcio-tools into
``qis_beam/proto/`` on every build (``pip install .`` and ``pip install -e .``);
the generated modules are not committed.

``pipelines/`` and ``runners/`` live at the top of the repository and are mapped into the
package by ``package_dir`` as ``qis_beam.pipelines`` / ``qis_beam.runners``: a wheel installs
them inside ``qis_beam/``, and an editable install (``pip install -e .``, what CI and the
README use; a checkout needs it for these two subpackages) maps them to the checkout's
folders. They never claim generic top-level module names.

The deployment kits (``runners/flink/``, ``runners/dataflow/``: Dockerfiles, compose file,
shell scripts) are files of the repository, not package data: they are used from a checkout
(``docker build`` takes the repository as its context) and no installed code reads them.
``qis_beam/stack/pins.toml`` is package data because ``qis-beam stack fetch`` reads it.
"""

import pathlib
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
PROTO_OUT = ROOT / "qis_beam" / "proto"


def compile_protos() -> None:
    """Compile protos/qis/v1/*.proto into qis_beam/proto/<name>_pb2.py (+ _pb2_grpc.py)."""
    import tempfile

    from grpc_tools import protoc

    sources = sorted(PROTO_ROOT.glob("qis/v1/*.proto"))
    if not sources:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}"]
        args.append(f"--grpc_python_out={tmp}")  # services (query.proto) get *_pb2_grpc.py
        if protoc.main(args + [str(s) for s in sources]) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(map(str, sources)))
        # Descriptor names stay "qis/v1/<name>.proto" (unique in the global pool); the
        # modules import nothing of each other, so they can live flat in qis_beam.proto.
        for generated in pathlib.Path(tmp, "qis", "v1").glob("*_pb2.py"):
            shutil.copy(generated, PROTO_OUT / generated.name)
        # Service stubs import their messages as "qis.v1.<name>_pb2": point them at the
        # flat package. Files without a service are empty and not kept.
        for stub in pathlib.Path(tmp, "qis", "v1").glob("*_pb2_grpc.py"):
            text = stub.read_text(encoding="utf-8")
            if "class " in text:
                text = text.replace("from qis.v1 import ", "from qis_beam.proto import ")
                (PROTO_OUT / stub.name).write_text(text, encoding="utf-8")


# Top-level folders installed as subpackages of qis_beam (their own modules only: the
# deployment kits under runners/ have no __init__.py and stay out of the package).
MAPPED = {"qis_beam.pipelines": "pipelines", "qis_beam.runners": "runners"}


class BuildPyWithProtos(build_py):
    def run(self):
        compile_protos()
        # build/lib outlives builds: without this, modules moved or deleted since the last
        # in-tree build (pip install /path/to/checkout) would still ship in the wheel.
        shutil.rmtree(pathlib.Path(self.build_lib, "qis_beam"), ignore_errors=True)
        super().run()


setup(
    name="qis-beam",
    version="0.1.0",
    description="Outcome routing for ML training swarms on Apache Beam",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["qis_beam", "qis_beam.*"]), *MAPPED],
    package_dir=MAPPED,
    package_data={"qis_beam.stack": ["pins.toml"]},  # pinned engine artifacts (stack fetch)
    cmdclass={"build_py": BuildPyWithProtos},
    install_requires=[
        "apache-beam[gcp]>=2.77.0,<2.78",
        # Runtime must be at least the gencode version (6.33.5 from grpcio-tools 1.81).
        "protobuf>=6.33.5,<7",
        "numpy>=1.26,<3",
        "pynacl>=1.5,<2",
        # qis-beam report: PNG figures on the Agg canvas (no GUI toolkit needed).
        "matplotlib>=3.8,<4",
        # Serving (qis_beam/store, qis_beam/service): PostgreSQL store and the gRPC service.
        # grpcio comes with Beam; health/reflection 1.81 match the grpcio-tools gencode and
        # keep protobuf 6 (1.82+ require protobuf 7, which Beam 2.77 refuses).
        "psycopg[binary]>=3.2,<4",
        "psycopg-pool>=3.2,<4",
        "grpcio>=1.81.1,<2",
        "grpcio-health-checking>=1.81.1,<1.82",
        "grpcio-reflection>=1.81.1,<1.82",
        # Live transports (qis_beam/transports.py): the Kafka producer; Pub/Sub comes with [gcp].
        "confluent-kafka>=2.6,<3",
        # qis-beam stack fetch: download progress on a terminal.
        "tqdm>=4.66,<5",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["qis-beam=qis_beam.cli:main"]},
)
