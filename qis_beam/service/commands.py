"""``qis-beam serve`` and ``qis-beam query --server`` (argument parsing stays in qis_beam/cli)."""

from __future__ import annotations

import json
import signal
import sys
import threading

EXIT_FAILED = 1
EXIT_NOT_FOUND = 3


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(f"{flag} {path}: {error.strerror or error}") from None


def serve_config(args):
    """ServeConfig from parsed arguments; ValueError names the bad flag."""
    from qis_beam.service.auth import load_tokens
    from qis_beam.service.server import ServeConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tokens: tuple[bytes, ...] = ()
    if args.token_file:
        try:
            tokens = tuple(load_tokens(args.token_file))
        except OSError as error:
            raise ValueError(f"--token-file {args.token_file}: {error.strerror}") from None
        except ValueError as error:
            raise ValueError(f"--token-file {error}") from None
    return ServeConfig(
        host=args.host,
        port=args.port,
        tls_cert=_read(args.tls_cert, "--tls-cert"),
        tls_key=_read(args.tls_key, "--tls-key"),
        tokens=tokens,
        workers=args.workers,
    )


def _serve_until_signalled(
    store_url: str, config, processes: int = 1, announce: bool = True
) -> int:
    from qis_beam.service.server import SERVICE_NAME, start_server
    from qis_beam.store import StoreNotFound, open_store, redact

    try:
        store = open_store(store_url, pool_size=config.workers)
    except StoreNotFound as error:
        print(f"qis-beam serve: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        running = start_server(store, config)
    except (OSError, RuntimeError, ValueError) as error:
        store.close()
        print(f"qis-beam serve: {error}", file=sys.stderr)
        return EXIT_FAILED
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children = []
    if announce:
        # Python gRPC serves one process's worth of CPU (the GIL): more processes share the
        # port through SO_REUSEPORT. Spawned, never forked (gRPC does not survive fork).
        import dataclasses
        import multiprocessing

        child_config = dataclasses.replace(config, port=running.port)
        ctx = multiprocessing.get_context("spawn")
        for _ in range(processes - 1):
            child = ctx.Process(target=_child, args=(store_url, child_config), daemon=True)
            child.start()
            children.append(child)
        scheme = "TLS" if config.tls_cert else "plaintext"
        auth = "bearer token required" if config.tokens else "no authentication"
        procs = f", {len(children) + 1} processes" if children else ""
        print(
            f"serving {SERVICE_NAME} on {config.host}:{running.port} ({scheme}, {auth}"
            f"{procs}); store {redact(store.url)}",
            flush=True,
        )
    stop.wait()
    for child in children:
        child.terminate()
    running.stop(grace=2.0)
    store.close()
    for child in children:
        child.join(timeout=10)
    return 0


def _child(store_url: str, config) -> None:
    sys.exit(_serve_until_signalled(store_url, config, announce=False))


def serve(args, config) -> int:
    """Serve until SIGINT/SIGTERM (``--processes N``: N processes on one port)."""
    if args.processes > 1:
        import dataclasses

        config = dataclasses.replace(config, reuse_port=True)
    return _serve_until_signalled(args.store, config, args.processes)


def query_server(args, address: str) -> int:
    from qis_beam.client import IntelligenceClient, NotFound, QueryError

    token = None
    if args.token_file:
        from qis_beam.service.auth import load_tokens

        token = load_tokens(args.token_file)[0].decode()
    client = IntelligenceClient(
        args.server, token=token, tls_root_cert=args.tls_root_cert, timeout=args.timeout
    )
    try:
        with client:
            if args.window:
                result = [w.to_record() for w in client.windows(address)]
            else:
                result = client.synthesis(address).to_record()
    except NotFound as error:
        print(f"qis-beam query: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except QueryError as error:
        print(f"qis-beam query: {args.server}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if not result:
        print(f"qis-beam query: no window synthesis for address {address}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(json.dumps(result, indent=2))
    return 0
