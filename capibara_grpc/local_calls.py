"""Calls between services that share a process, without the network: what gRPC's in-process
transport does in C++ and Java, which grpc.aio lacks.

A `LocalChannel` stands in for a grpc.aio.Channel, so the generated stubs and the clients built on
them are the same either way. A call on it runs the other service's handler, with the same error
mapping, metrics and logs as a call over the network (errors.py's mapped handlers), directly in
the caller's task:
- the request and the responses are the protobuf messages themselves, never serialized (neither
  side changes a message once it has passed it on);
- metadata reaches the handler as invocation metadata, with the request id (tracing.py), as the
  client interceptor sends it over the network;
- the deadline (`timeout=`) is kept: DEADLINE_EXCEEDED when it passes, the handler cancelled;
- cancelling the caller cancels the handler, and `call.cancel()` (or leaving a stream early)
  closes it, as a cancelled RPC would;
- a refusal is a grpc.aio.AioRpcError with the code, details and trailing metadata that the same
  handler would have sent over the network.

Methods not served in this process (another process's services, streams written with
context.write) go to the network channel it was given.
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from capibara_grpc import tracing

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True, slots=True)
class LocalMethod:
    """One method of a service in this process, behind the error mapping: `unary` is
    `async (request, context) -> response`, `stream` an async generator (request, context)."""

    unary: Callable[[typing.Any, LocalContext], Awaitable[typing.Any]] | None = None
    stream: Callable[[typing.Any, LocalContext], AsyncIterator[typing.Any]] | None = None


class LocalContext:
    """The grpc.aio.ServicerContext of a local call: what the mesh's handlers use of one."""

    __slots__ = ("_metadata", "_deadline", "_code", "_details", "_initial", "_trailing", "_loop")

    def __init__(self, metadata: Metadata, deadline: float | None, loop: asyncio.AbstractEventLoop):
        self._metadata = metadata
        self._deadline = deadline
        self._loop = loop
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._initial: Metadata = ()
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> typing.NoReturn:
        self._code, self._details, self._trailing = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self._initial = tuple(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def peer(self) -> str:
        return "local"

    def cancelled(self) -> bool:
        return False

    def error(self) -> grpc.aio.AioRpcError | None:
        """What the caller gets when the handler set a code other than OK and returned."""
        if self._code is None or self._code == grpc.StatusCode.OK:
            return None
        return self.rpc_error(self._code, self._details)

    def rpc_error(self, code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(*self._initial), grpc.aio.Metadata(*self._trailing), details, None
        )

    def aborted(self) -> grpc.aio.AioRpcError:
        return self.rpc_error(self._code or grpc.StatusCode.UNKNOWN, self._details)


def _metadata(metadata) -> Metadata:
    """The call's metadata as the handler sees it, with the request id the client interceptor would add."""
    request_id = tracing.current_request_id.get()
    pairs = tuple((k, v) for k, v in metadata or () if k != tracing.REQUEST_ID)
    return (*pairs, (tracing.REQUEST_ID, request_id)) if request_id else pairs


class _Call:
    """What unary and streaming local calls share: the context, the deadline, cancellation."""

    def __init__(self, timeout: float | None, metadata):
        self._loop = asyncio.get_running_loop()
        deadline = None if timeout is None else self._loop.time() + timeout
        self._context = LocalContext(_metadata(metadata), deadline, self._loop)
        self._outcome: grpc.aio.AioRpcError | None = None
        self._ok = False

    def _deadline_error(self) -> grpc.aio.AioRpcError:
        return self._context.rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(*self._context._initial)

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(*self._context._trailing)

    async def code(self) -> grpc.StatusCode:
        return self._outcome.code() if self._outcome else grpc.StatusCode.OK

    async def details(self) -> str:
        return self._outcome.details() if self._outcome else ""

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    async def wait_for_connection(self) -> None:
        return None

    def done(self) -> bool:
        return self._ok or self._outcome is not None

    def cancelled(self) -> bool:
        return self._outcome is not None and self._outcome.code() == grpc.StatusCode.CANCELLED

    def _fail(self, error: grpc.aio.AioRpcError) -> typing.NoReturn:
        self._outcome = error
        raise error


class LocalUnaryCall(_Call):
    """A unary call: awaiting it runs the handler (in the caller's task) and returns its response."""

    def __init__(self, handler, request, timeout, metadata):
        super().__init__(timeout, metadata)
        self._handler = handler
        self._request = request

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        context = self._context
        try:
            if context._deadline is None:
                response = await self._handler(self._request, context)
            else:
                async with asyncio.timeout_at(context._deadline):
                    response = await self._handler(self._request, context)
        except grpc.aio.AbortError:
            self._fail(context.aborted())
        except TimeoutError:
            self._fail(self._deadline_error())
        error = context.error()
        if error is not None:
            self._fail(error)
        self._ok = True
        return response

    def cancel(self) -> bool:
        return False  # it runs in the caller's task: cancelling the caller cancels it


class LocalStreamCall(_Call):
    """A server-streaming call: iterating it runs the handler's generator in the caller's task.
    One timer per call for the deadline; when it passes while the caller waits for the next
    message, the wait is cancelled and the caller gets DEADLINE_EXCEEDED."""

    def __init__(self, handler, request, timeout, metadata):
        super().__init__(timeout, metadata)
        self._stream = handler(request, self._context)
        self._waiting: asyncio.Task | None = None  # the caller's task, while it waits in __anext__
        self._expired = False
        self._timer = (
            None if self._context._deadline is None else self._loop.call_at(self._context._deadline, self._expire)
        )

    def _expire(self) -> None:
        self._expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._outcome is not None:
            raise self._outcome
        if self._expired:
            await self._close()
            self._fail(self._deadline_error())
        self._waiting = asyncio.current_task()
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._finish()
            error = self._context.error()
            if error is not None:
                self._fail(error)
            self._ok = True
            raise
        except grpc.aio.AbortError:
            self._finish()
            self._fail(self._context.aborted())
        except asyncio.CancelledError:
            if self._expired and self._waiting is not None and self._waiting.uncancel() == 0:
                self._finish()
                self._fail(self._deadline_error())
            self._finish()
            raise
        except BaseException:
            self._finish()
            raise
        finally:
            self._waiting = None

    async def read(self):
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _close(self) -> None:
        self._finish()
        await self._stream.aclose()

    def cancel(self) -> bool:
        """The caller stops listening: the handler's generator is closed (GeneratorExit in it, as
        a cancelled RPC's handler sees its cancellation)."""
        if self.done():
            return False
        self._outcome = self._context.rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        self._finish()
        if self._stream.ag_frame is None:  # already ended (the caller was cancelled inside it)
            return True
        close = asyncio.ensure_future(self._stream.aclose())
        close.add_done_callback(_drop_exception)
        return True


def _drop_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class _MultiCallable:
    """One method of a LocalChannel; finds its local handler at the first call (services start one
    after another), else uses the network channel's."""

    def __init__(self, methods: dict[str, LocalMethod], method: str, network: Callable[[], typing.Any], kind: str):
        self._methods = methods
        self._method = method
        self._network = network
        self._kind = kind
        self._target = None  # found at the first call: the local handler, or the network's
        self._local = False

    def __call__(
        self, request, *, timeout=None, metadata=None, credentials=None, wait_for_ready=None, compression=None
    ):
        target = self._target
        if target is None:
            local = self._methods.get(self._method)
            handler = getattr(local, self._kind) if local else None
            target = self._target = handler or self._network()
            self._local = handler is not None
        if not self._local:
            return target(request, timeout=timeout, metadata=metadata, wait_for_ready=wait_for_ready)
        call = LocalUnaryCall if self._kind == "unary" else LocalStreamCall
        return call(target, request, timeout, metadata)


class LocalChannel:
    """A grpc.aio.Channel for the stubs of services in this process: their methods run locally
    (`methods`, filled as the services start), anything else goes over `network`."""

    def __init__(self, methods: dict[str, LocalMethod], network: grpc.aio.Channel):
        self._methods = methods
        self._channel = network

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi_callable("unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self._multi_callable("stream", method, request_serializer, response_deserializer, _registered_method)

    def _multi_callable(self, kind: str, method: str, *network_args) -> _MultiCallable:
        make = self._channel.unary_unary if kind == "unary" else self._channel.unary_stream
        return _MultiCallable(self._methods, method, lambda: make(method, *network_args), kind)

    def stream_unary(self, *args, **kwargs):
        return self._channel.stream_unary(*args, **kwargs)

    def stream_stream(self, *args, **kwargs):
        return self._channel.stream_stream(*args, **kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False):
        return self._channel.get_state(try_to_connect)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def wait_for_state_change(self, last_observed_state):
        await self._channel.wait_for_state_change(last_observed_state)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
