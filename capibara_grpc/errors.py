"""Errors raised by the service cores, and the one place that maps them to gRPC status.

Cores raise these plain exceptions and know nothing of gRPC; `mapped_handler`, put around every
method of every server by `ErrorMappingServer`, turns them (and errors from upstream gRPC calls,
timeouts and bugs) into status codes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import typing
from dataclasses import dataclass

import grpc

from capibara_grpc import metrics, tracing
from capibara_grpc.local_calls import LocalMethod
from capibara_grpc.telemetry import server_spans
from capibara_grpc.telemetry.server_spans import ServerCall
from capibara_grpc.telemetry.spans import current as current_span

log = logging.getLogger(__name__)
# One line per finished call: method, code, duration, request id.
calls_log = logging.getLogger("capibara.calls")

# gRPC metadata key; Envoy forwards it as the HTTP Retry-After header of REST replies.
RETRY_AFTER = "retry-after"


class MeshError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidField(InvalidArgument):
    """A request field refused: the message starts with the field's name ("max_tokens: must be
    between 1 and 8192, got 10000"), which the OpenAI API turns into `error.param`."""

    def __init__(self, field: str, text: str):
        super().__init__(f"{field}: {text}")
        self.field = field
        self.text = text


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(MeshError):
    """Too busy now; the client may retry after `retry_after_s` (sent as `retry-after` metadata,
    which Envoy passes on as the Retry-After header of the 429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendRefusedKey(MeshError):
    """A model server refused the mesh's own credentials (HTTP 401/403): the mesh's configuration
    is wrong, not the client's request. INTERNAL (HTTP 500), so it is never retried on that
    server; a routed chat still fails over to another model."""

    code = grpc.StatusCode.INTERNAL


class UpstreamError(MeshError):
    """An error returned by another service of the mesh, passed on with its own status."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


def error_from_status_name(name: str, message: str) -> MeshError:
    """Rebuild an error from a status name carried in-band (e.g. a stream's error event)."""
    return UpstreamError(grpc.StatusCode[name], message)


@dataclass(frozen=True)
class StreamError:
    """The in-band error event that ends a stream which had already started (a chat's, a
    consensus run's): once a response has begun, a failure can no longer be a status, so it is
    the stream's last event. The one Python name for it; on the wire it is the gateway's
    `StreamError` message and consensus' `ConsensusError` (proto names are public API)."""

    code: str  # gRPC status name, e.g. "UNAVAILABLE"
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException, where: str, prefix: str = "") -> StreamError:
        """The event for an exception (a bug is logged and becomes INTERNAL, as in to_mesh_error)."""
        error = to_mesh_error(exc, where)
        return cls(error.code.name, prefix + error.message)

    def to_exception(self) -> MeshError:
        """The error again, for a unary call that collected the stream (Complete, Decide)."""
        return error_from_status_name(self.code, self.message)


def as_mesh_error(exc: BaseException) -> MeshError | None:
    """The MeshError an exception stands for, or None for a bug."""
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        retry_after = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER)
        return UpstreamError(
            exc.code(),
            exc.details() or exc.code().name,
            int(retry_after) if retry_after and retry_after.isdigit() else None,
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DeadlineExceeded("deadline exceeded")
    return None


def code_name(exc: BaseException) -> str:
    """The gRPC status name a call that ended with `exc` is counted under: CANCELLED when the
    caller went away (asyncio.CancelledError, GeneratorExit), the code of the MeshError it
    stands for (as_mesh_error: an upstream call's own code, DEADLINE_EXCEEDED for a timeout),
    else INTERNAL (a bug). Nothing is logged."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    error = as_mesh_error(exc)
    return error.code.name if error is not None else "INTERNAL"


def to_mesh_error(exc: BaseException, where: str) -> MeshError:
    """The MeshError an exception stands for; a bug is logged and becomes INTERNAL."""
    error = as_mesh_error(exc)
    if error is None:
        log.exception("unexpected error in %s", where)
        error = MeshError(f"internal error in {where}: {type(exc).__name__}")
    return error


async def _abort(context: grpc.aio.ServicerContext, error: MeshError):
    retry_after = getattr(error, "retry_after_s", None)
    await context.abort(
        error.code, error.message, trailing_metadata=((RETRY_AFTER, str(retry_after)),) if retry_after else ()
    )


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


async def _finish(
    method: str,
    context: grpc.aio.ServicerContext,
    started: float,
    key: str,
    exc: BaseException | None,
    traced: ServerCall | None = None,
):
    """The end of one call, unary or streaming: its error mapped to a status (aborting the call),
    its final code counted, timed, logged and put on its span."""
    code = "OK"
    details = ""
    try:
        if exc is None:
            return
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
            return
        if isinstance(exc, grpc.aio.AbortError):
            code = _aborted_code(context)
            return
        error = to_mesh_error(exc, method)
        code, details = error.code.name, error.message
        await _abort(context, error)  # raises AbortError, which ends the call
    finally:
        metrics.observe_call(method, code, started, key)
        # Health checks (Envoy's, every 2 s per replica) would drown the log: debug level.
        level = logging.DEBUG if method.startswith("/grpc.health.v1.") else logging.INFO
        if calls_log.isEnabledFor(level):
            fields = {"method": method, "code": code, "ms": round((time.perf_counter() - started) * 1000, 1)}
            calls_log.log(level, "%s %s", method, code, extra={"fields": fields})
        if traced is not None:  # after the log line, which carries the span's trace id
            traced.end(code, details, key)


def _begin(method: str, context: grpc.aio.ServicerContext) -> tuple[float, str, ServerCall | None]:
    """A call starts: its request id taken (tracing), its span begun (telemetry); (start time,
    the caller's API key id, the span)."""
    metadata = context.invocation_metadata()
    request_id, key = tracing.ids_from(metadata)
    tracing.current_request_id.set(request_id)
    return time.perf_counter(), key, server_spans.begin(method, metadata)


def mapped_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with the error mapping around it: the one place where exceptions become status
    codes. It also takes the call's request id (tracing), counts every call and its duration by
    method and final code, and logs it."""
    return mapped_methods(method, handler)[0]


def mapped_methods(method: str, handler: grpc.RpcMethodHandler) -> tuple[grpc.RpcMethodHandler, LocalMethod | None]:
    """mapped_handler's handler, and the same mapped method for a caller in this process
    (local_calls.py), which passes the request message itself: None for a method that only the
    network can call (a stream written with context.write)."""
    deserialize = handler.request_deserializer

    def parse(raw: bytes):
        # Parsed here, not by grpc: a malformed message (or a string that is not UTF-8) is the
        # caller's mistake, INVALID_ARGUMENT, where grpc itself would answer INTERNAL.
        try:
            return deserialize(raw) if deserialize else raw
        except Exception as exc:  # noqa: BLE001 - any parse failure is the request's fault
            raise InvalidArgument(
                f"the request is not a valid {method.rsplit('/', 1)[-1]} request message ({type(exc).__name__})"
            ) from None

    if handler.unary_unary:
        grpc_handler = grpc.unary_unary_rpc_method_handler(
            _mapped_unary(method, handler.unary_unary, parse), None, handler.response_serializer
        )
        return grpc_handler, LocalMethod(unary=_mapped_unary(method, handler.unary_unary))
    # Streams written with context.write() (grpc.health's Watch) are left as they are.
    if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
        grpc_handler = grpc.unary_stream_rpc_method_handler(
            _mapped_stream(method, handler.unary_stream, parse), None, handler.response_serializer
        )
        return grpc_handler, LocalMethod(stream=_mapped_stream(method, handler.unary_stream))
    return handler, None


def _mapped_unary(method: str, inner, parse=None):
    """`inner` (a unary handler) mapped; `parse` turns the bytes from the network into the request."""

    async def unary_unary(request, context):
        started, key, traced = _begin(method, context)
        try:
            response = await inner(parse(request) if parse else request, context)
        except BaseException as exc:  # noqa: BLE001 - mapped (or passed on) by _finish
            await _finish(method, context, started, key, exc, traced)
            raise
        await _finish(method, context, started, key, None, traced)
        return response

    return unary_unary


def _mapped_stream(method: str, inner, parse=None):
    """`inner` (an async generator handler) mapped, as _mapped_unary."""

    async def unary_stream(request, context):
        started, key, traced = _begin(method, context)
        try:
            if traced is None:
                async for response in inner(parse(request) if parse else request, context):
                    yield response
            else:
                async for response in inner(parse(request) if parse else request, context):
                    # A local caller reads the message in this same context: its own span is
                    # current while it does, this call's again when the handler goes on.
                    current_span.set(traced.previous)
                    yield response
                    current_span.set(traced.span)
        except BaseException as exc:  # noqa: BLE001 - mapped (or passed on) by _finish
            await _finish(method, context, started, key, exc, traced)
            raise
        await _finish(method, context, started, key, None, traced)

    return unary_stream


class _MappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose answers are wrapped by mapped_handler, once per method. It assumes
    the inner handler answers the same handler for a method whatever the call's metadata, as the
    generated ones and grpc's method_handlers_generic_handler do."""

    def __init__(self, inner: grpc.GenericRpcHandler):
        self.inner = inner
        self.by_method: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        mapped = self.by_method.get(method)
        if mapped is None:
            handler = self.inner.service(handler_call_details)
            if handler is None:
                return None  # not this service's: not remembered, so unknown paths cost no memory
            mapped = self.by_method[method] = mapped_handler(method, handler)
        return mapped


class ErrorMappingServer:
    """A grpc.aio.Server whose every servicer (health and reflection too) gets the error mapping
    when it is added: each method's handler is wrapped once, where a grpc.aio.ServerInterceptor
    runs a coroutine and builds a new handler on every call (docs/benchmarks.md, "Model servers
    first, and where Route's CPU goes"). Everything else is the server's own."""

    def __init__(self, server: grpc.aio.Server, local: dict[str, LocalMethod] | None = None):
        self.server = server
        # The same mapped methods for callers in this process (local_calls.LocalChannel), by path.
        self.local = {} if local is None else local

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers([_MappedGenericHandler(h) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        mapped = {}
        for name, handler in handlers.items():
            path = f"/{service}/{name}"
            mapped[name], local = mapped_methods(path, handler)
            if local is not None:
                self.local[path] = local
        self.server.add_registered_method_handlers(service, mapped)

    def __getattr__(self, name: str):
        return getattr(self.server, name)


# A grpc.aio.Server to anything that asks (grpc_reflection, for one, picks its asyncio servicer
# only for an isinstance(server, grpc.aio.Server)).
grpc.aio.Server.register(ErrorMappingServer)


def error_mapping_server(
    options: list[tuple[str, typing.Any]] | None = None, local: dict[str, LocalMethod] | None = None
) -> ErrorMappingServer:
    """A new grpc.aio server with the error mapping on every servicer added to it; its methods
    also go into `local`, for callers in this process."""
    return ErrorMappingServer(grpc.aio.server(options=options), local)


def remaining_s(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """Seconds left of the caller's deadline, or `default_s` when the caller set none."""
    remaining = context.time_remaining()
    return remaining if remaining is not None else default_s
