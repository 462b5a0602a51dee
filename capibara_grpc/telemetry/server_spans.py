"""The SERVER span of each call a service of the mesh serves, made by the error mapping
(errors.py) around every handler, network or local: its parent is the caller's `traceparent`
metadata (Envoy's span, or the calling service's CLIENT span) or, for a call from a service in
the same process, the caller's own span; it is the current span while the handler runs, so
everything the handler does becomes its child."""

from __future__ import annotations

import grpc

from capibara_grpc.telemetry import spans
from capibara_grpc.telemetry.channel import end_rpc_span, rpc_attributes

_ATTRIBUTES: dict[str, dict] = {}
_CODES = {code.name: code for code in grpc.StatusCode}


class ServerCall:
    """A served call's span, and the span that was current before it (given back when it ends,
    and around each message a stream yields: a local caller runs in the same context)."""

    __slots__ = ("span", "previous")

    def __init__(self, span: spans.Span, previous: spans.Span | None):
        self.span, self.previous = span, previous

    def end(self, code: str, details: str = "", key_id: str = "") -> None:
        spans.current.set(self.previous)
        if key_id:
            self.span.set("capibara.api_key.id", key_id)
        end_rpc_span(self.span, _CODES[code], details)


def begin(method: str, metadata) -> ServerCall | None:
    """The span of a call to `method` (a mesh service's: /capibara.<service>.v1.X/Y), made
    current; None when tracing is off or for grpc.health and reflection calls."""
    tracer = spans.TRACER
    if tracer is None or not method.startswith("/capibara."):
        return None
    # A call over the network names its parent in `traceparent`; a local call (local_calls.py)
    # runs in its caller's context, where the caller's span is current.
    previous = spans.current.get()
    parent = previous
    for key, value in metadata or ():
        if key == spans.TRACEPARENT:
            parent = spans.parse_traceparent(value if isinstance(value, str) else value.decode())
            break
    else:
        if previous is not None and not previous.recording:
            return None  # a local call in a chat that is not sampled: its caller's span will do
    service = method[10 : method.index(".", 10)]
    span = tracer.start(method[1:], spans.SERVER, parent, service)
    if span.recording:
        attributes = _ATTRIBUTES.get(method)
        if attributes is None:
            attributes = _ATTRIBUTES[method] = rpc_attributes(method)
        span.attributes.update(attributes)
    spans.current.set(span)
    return ServerCall(span, previous)
