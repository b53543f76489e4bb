"""Bearer-token authentication for every call (``--token-file``)."""

from __future__ import annotations

import hmac

import grpc

_DENIED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def load_tokens(path: str) -> list[bytes]:
    """One token per line; blank lines and ``#`` comments ignored (several allow rotation)."""
    with open(path, encoding="utf-8") as f:
        tokens = [line.strip() for line in f]
    tokens = [t.encode() for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"{path}: no token in the file")
    return tokens


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def token_valid(offered: bytes | None, tokens: list[bytes]) -> bool:
    """Compare against every token in constant time (no early exit, no length leak per token
    beyond what hmac.compare_digest allows)."""
    if offered is None:
        offered = b""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(offered, token)
    return ok and bool(offered)


def _denied_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def deny_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - a generator for response-streaming methods

    kwargs = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every method, health and reflection included, needs a valid token."""

    def __init__(self, tokens: list[bytes]):
        self._tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or token_valid(
            _bearer(handler_call_details.invocation_metadata), self._tokens
        ):
            return handler
        return _denied_handler(handler)
