"""The Python SDK worker pool beside the stack's TaskManagers (``--environment_type=EXTERNAL``).

Flink asks the pool for an SDK worker whenever a task needs one. In a batch job that is every
stage: the Beam runner releases a stage's environment when its task ends (it keeps it only when
Beam's classes sit on Flink's own classpath), so a backfill of ~20 stages starts ~20 workers
one after another. Beam's pool (``worker_pool_main``) runs each as a fresh ``python`` from
PATH, 2-3 s of imports apiece, without a state cache. This pool forks its workers from a
``multiprocessing`` fork server that imported Beam's harness and this project's transforms
once: a worker is up in well under a second, runs this interpreter (the venv's) and has a
state cache. One worker is one process, so ``--sdk_worker_parallelism=2`` uses both cores.

Run as ``python -m qis_beam.stack.worker_pool --port P``; SIGTERM stops the workers too (the
stack also stops the whole process group by PID).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import signal
import sys
import threading
import traceback
from concurrent import futures

import grpc
from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc

#: Imported once by the fork server, so forked workers start with them loaded.
PRELOAD = [
    "apache_beam.runners.worker.sdk_worker",
    "apache_beam.runners.worker.bundle_processor",
    "qis_beam.transforms.ingest",
    "qis_beam.transforms.synthesize",
    "qis_beam.transforms.outputs",
    "qis_beam.transforms.read",
    "qis_beam.transforms.streaming",
]
#: Seconds a stopped worker gets to exit before it is killed.
STOP_GRACE_S = 10.0
DEFAULT_STATE_CACHE_MB = 100

_LOG = logging.getLogger("qis_beam.worker_pool")


def run_harness(control_url: str, worker_id: str, state_cache_bytes: int) -> None:
    """A forked worker: Beam's SDK harness on the runner's control endpoint until it ends."""
    from apache_beam.runners.worker.sdk_worker import SdkHarness

    SdkHarness(control_url, worker_id=worker_id, state_cache_size=state_cache_bytes).run()


def _stop(process: multiprocessing.process.BaseProcess) -> None:
    process.terminate()
    process.join(STOP_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()


class ForkingWorkerPool(beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolServicer):
    """Beam's ``BeamFnExternalWorkerPool`` service, forking workers from a fork server."""

    def __init__(self, context, state_cache_bytes: int):
        self._context = context
        self._state_cache_bytes = state_cache_bytes
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        self._lock = threading.Lock()

    def StartWorker(self, request, context):  # noqa: N802 - gRPC method name
        try:
            process = self._context.Process(
                target=run_harness,
                args=(request.control_endpoint.url, request.worker_id, self._state_cache_bytes),
                name=f"sdk-worker-{request.worker_id}",
                daemon=True,
            )
            process.start()
        except Exception:  # noqa: BLE001 - the runner gets the reason, the pool keeps serving
            return beam_fn_api_pb2.StartWorkerResponse(error=traceback.format_exc())
        with self._lock:
            self._workers[request.worker_id] = process
        _LOG.info("started worker %s (pid %s)", request.worker_id, process.pid)
        return beam_fn_api_pb2.StartWorkerResponse()

    def StopWorker(self, request, context):  # noqa: N802 - gRPC method name
        with self._lock:
            process = self._workers.pop(request.worker_id, None)
        if process is not None:
            _stop(process)
            _LOG.info("stopped worker %s", request.worker_id)
        return beam_fn_api_pb2.StopWorkerResponse()

    def stop_all(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for process in workers:
            _stop(process)


def serve(port: int, state_cache_mb: int = DEFAULT_STATE_CACHE_MB):
    """Start the pool on 127.0.0.1:``port``; returns (server, pool)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    warm = context.Process(target=int)  # starts the fork server and its imports now
    warm.start()
    warm.join()
    pool = ForkingWorkerPool(context, state_cache_mb << 20)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"the SDK worker pool cannot listen on 127.0.0.1:{port}")
    server.start()
    return server, pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state-cache-mb", type=int, default=DEFAULT_STATE_CACHE_MB)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server, pool = serve(args.port, args.state_cache_mb)
    _LOG.info("SDK worker pool listening on 127.0.0.1:%d", args.port)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=1)
    with contextlib.suppress(Exception):
        pool.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
