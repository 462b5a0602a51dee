"""Client spans for the mesh's calls between its services: a channel wrapper, so that the
generated stubs and every client built on them stay as they are.

A `TracedChannel` wraps a grpc.aio.Channel (server.py): each unary or server-streaming call
made inside a traced chat gets a CLIENT span, a child of the caller's current span, and sends it
as the `traceparent` metadata, which the called service's error mapping (errors.py) makes the
parent of its SERVER span. A LocalChannel (local_calls.py) goes around it, not inside: a call to
a service in the same process is a function call, with no CLIENT span. A stream's span ends with the stream:
its last message read, its error, or its cancellation. Calls outside any chat (health checks,
status probes) are passed on untouched. Only used when tracing is on: otherwise the channel is
not wrapped at all.
"""

from __future__ import annotations

import asyncio

import grpc

from capibara_grpc.telemetry import spans
from capibara_grpc.telemetry.spans import CLIENT, TRACEPARENT, Span, current


def rpc_attributes(method: str) -> dict:
    """OpenTelemetry's RPC attributes of a method path (/package.Service/Method)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def end_rpc_span(span: Span, code: grpc.StatusCode, details: str = "") -> None:
    """A call's span ends with its status (rpc.grpc.status_code; an error status unless OK)."""
    if span.recording:
        span.attributes["rpc.grpc.status_code"] = code.value[0]
        if code is not grpc.StatusCode.OK:
            span.fail(f"{code.name}: {details}" if details else code.name)
    span.end()


def _with_parent(metadata, span: Span) -> tuple:
    return (*(metadata or ()), (TRACEPARENT, span.traceparent))


def _start(method: str, attributes: dict) -> Span | None:
    """The call's span; None outside a chat, and the caller's own span (not a new one) in a chat
    that is not sampled: its `traceparent` still tells the next hop so."""
    parent = current.get()
    if parent is None or not parent.recording or spans.TRACER is None:
        return parent
    span = spans.TRACER.start(method.lstrip("/"), CLIENT, parent)
    span.attributes.update(attributes)
    return span


async def _unary(call, span: Span):
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        end_rpc_span(span, exc.code(), exc.details() or "")
        raise
    except asyncio.CancelledError:
        end_rpc_span(span, grpc.StatusCode.CANCELLED)
        raise
    end_rpc_span(span, grpc.StatusCode.OK)
    return response


class _TracedStreamCall:
    """A server-streaming call whose span ends with it; iterated and cancelled as the call is."""

    __slots__ = ("_call", "_span", "_messages")

    def __init__(self, call, span: Span):
        self._call, self._span, self._messages = call, span, None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._messages is None:
            self._messages = self._call.__aiter__()
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            end_rpc_span(self._span, grpc.StatusCode.OK)
            raise
        except grpc.aio.AioRpcError as exc:
            end_rpc_span(self._span, exc.code(), exc.details() or "")
            raise
        except asyncio.CancelledError:
            end_rpc_span(self._span, grpc.StatusCode.CANCELLED)
            raise

    def cancel(self) -> bool:
        cancelled = self._call.cancel()
        if cancelled:  # False once the call had ended: its span has its status already
            end_rpc_span(self._span, grpc.StatusCode.CANCELLED, "the caller stopped reading")
        return cancelled

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class _TracedMethod:
    """One method of a TracedChannel: each call in a sampled chat sends its CLIENT span as the
    `traceparent`, and `traced(call, span)` ends the span with the call (_unary, _TracedStreamCall)."""

    __slots__ = ("_inner", "_method", "_attributes", "_traced")

    def __init__(self, inner, method: str, traced):
        self._inner, self._method, self._traced = inner, method, traced
        self._attributes = rpc_attributes(method)

    def __call__(self, request, *, timeout=None, metadata=None, **options):
        span = _start(self._method, self._attributes)
        if span is None:
            return self._inner(request, timeout=timeout, metadata=metadata, **options)
        call = self._inner(request, timeout=timeout, metadata=_with_parent(metadata, span), **options)
        return self._traced(call, span) if span.recording else call


class TracedChannel:
    """`channel` (grpc.aio or local) with client spans on its unary and server-streaming calls."""

    def __init__(self, channel):
        self._channel = channel

    def unary_unary(self, method, *args, **kwargs):
        return _TracedMethod(self._channel.unary_unary(method, *args, **kwargs), method, _unary)

    def unary_stream(self, method, *args, **kwargs):
        return _TracedMethod(self._channel.unary_stream(method, *args, **kwargs), method, _TracedStreamCall)

    def __getattr__(self, name: str):
        return getattr(self._channel, name)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self._channel.close()
