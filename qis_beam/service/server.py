"""The gRPC server: qis.v1.IntelligenceService, standard health checking and reflection.

Statuses: INVALID_ARGUMENT (the message starts with the field at fault), NOT_FOUND (no
synthesis for the address), UNAVAILABLE (the store cannot be reached; the health service
says NOT_SERVING until it answers again), DEADLINE_EXCEEDED (the call's deadline passed,
including while waiting for the store), UNAUTHENTICATED (``--token-file`` and no valid
bearer token). Binds 127.0.0.1 unless told otherwise.

An asyncio server (``grpc.aio``): every call is a coroutine on one event loop, and the store
is read through an asyncio pool, so no thread hand-offs or GIL contention between worker
threads eat the CPU a call needs. The loop runs in a background thread shared by every
server of the process, so callers (the CLI, tests) keep a blocking start/stop API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from qis_beam.proto import query_pb2, query_pb2_grpc
from qis_beam.service import convert
from qis_beam.service.auth import TokenInterceptor
from qis_beam.service.requests import (
    BadRequest,
    check_k,
    problem_address,
    target_address,
    window_range,
)
from qis_beam.store import Store, StoreUnavailable

SERVICE_NAME = query_pb2.DESCRIPTOR.services_by_name["IntelligenceService"].full_name
DEFAULT_PORT = 50051
STORE_WAIT_S = 1.0

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Loop:
    """The process's serving event loop, in a daemon thread, started on first use."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Awaitable, timeout: float | None = None):
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="qis-serve-loop", daemon=True
                ).start()
                cls._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, cls._loop).result(timeout)


class StoreHealth:
    """Keeps the health service's status in step with the store: a background ping every
    ``interval`` seconds, and every call's outcome in between."""

    def __init__(self, store: Store, interval: float = 2.0):
        self.servicer = health_aio.HealthServicer()
        self._store = store
        self._interval = interval
        self.serving: bool | None = None
        self._task: asyncio.Task | None = None

    async def set(self, serving: bool) -> None:
        if serving is self.serving:
            return
        self.serving = serving
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, _SERVING if serving else _NOT_SERVING)

    async def check(self) -> bool:
        try:
            await self._store.aping(timeout=min(self._interval, 2.0))
        except StoreUnavailable:
            await self.set(False)
            return False
        await self.set(True)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()


class IntelligenceServicer(query_pb2_grpc.IntelligenceServiceServicer):
    def __init__(self, store: Store, health_state: StoreHealth):
        self._store = store
        self._health = health_state

    async def _answer(self, context, work: Callable[[float], Awaitable[object]]):
        """Await ``work(seconds the store may take)``; map failures to statuses (abort
        raises)."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the lookup"
            )
        # Wait for the store at most half the time left (and 1 s): a store that is down is
        # reported as UNAVAILABLE within the deadline, so the client can back off and retry.
        store_wait = STORE_WAIT_S if remaining is None else min(remaining / 2, STORE_WAIT_S)
        try:
            result = await work(store_wait)
        except BadRequest as error:
            status, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except StoreUnavailable as error:
            await self._health.set(False)
            left = context.time_remaining()
            late = left is not None and left <= 0
            status = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.UNAVAILABLE
            message = f"store unavailable: {error}"
        else:
            if self._health.serving is not True:
                await self._health.set(True)
            if isinstance(result, str):  # an address with nothing stored
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no synthesis for address {result}")
            return result
        await context.abort(status, message)

    async def GetSynthesis(self, request, context):
        async def work(timeout):
            address = target_address(request)
            stored = await self._store.aentry(address, timeout=timeout)
            if stored is None:
                return address
            return query_pb2.SynthesisReply(synthesis=convert.synthesis(stored))

        return await self._answer(context, work)

    async def GetWindows(self, request, context):
        async def work(timeout):
            address = target_address(request)
            from_ms, to_ms, limit = window_range(request)
            found = await self._store.aentries(address, from_ms, to_ms, limit, timeout=timeout)
            if not found and await self._store.aentry(address, timeout=timeout) is None:
                return address  # an unknown address, not an empty range
            return query_pb2.WindowsReply(
                address=address, windows=[convert.synthesis(s) for s in found]
            )

        return await self._answer(context, work)

    async def Recommend(self, request, context):
        async def work(timeout):
            address = problem_address(request.template_id, request.context)
            k = check_k(request.k)
            stored = await self._store.aentry(address, timeout=timeout)
            if stored is None:
                return address
            return convert.recommendation(stored, k)

        return await self._answer(context, work)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    tls_cert: bytes | None = None  # PEM chain
    tls_key: bytes | None = None  # PEM private key
    tokens: tuple[bytes, ...] = ()  # empty: no authentication
    workers: int = 8  # store connections per process (calls themselves are coroutines)
    # Several server processes share the port (serve --processes): SO_REUSEPORT on. Off by
    # default, so a second server started by mistake fails instead of sharing silently.
    reuse_port: bool = False
    health_interval_s: float = 2.0


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: StoreHealth
    store: Store

    def stop(self, grace: float | None = 1.0) -> None:
        _Loop.run(self._stop(grace))

    async def _stop(self, grace: float | None) -> None:
        await self.health.stop()
        await self.server.stop(grace)
        await self.store.aclose()


async def _start(store: Store, config: ServeConfig) -> RunningServer:
    interceptors = [TokenInterceptor(list(config.tokens))] if config.tokens else []
    server = grpc.aio.server(
        interceptors=interceptors,
        # Never share a port with another process by accident.
        options=[("grpc.so_reuseport", 1 if config.reuse_port else 0)],
        maximum_concurrent_rpcs=config.workers * 64,  # beyond: RESOURCE_EXHAUSTED, not a queue
    )
    health_state = StoreHealth(store, config.health_interval_s)
    query_pb2_grpc.add_IntelligenceServiceServicer_to_server(
        IntelligenceServicer(store, health_state), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        credentials = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot listen on {address}")
    await health_state.start()
    await server.start()
    return RunningServer(server, port, health_state, store)


def start_server(store: Store, config: ServeConfig = ServeConfig()) -> RunningServer:
    """Start serving ``store`` on the process's serving loop; returns once it listens."""
    return _Loop.run(_start(store, config))
