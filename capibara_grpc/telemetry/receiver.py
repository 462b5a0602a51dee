"""An OTLP/gRPC trace receiver: the OpenTelemetry Collector's own `TraceService` (from
`opentelemetry-proto`), served with grpc.aio, that keeps every span it is sent.

Why: the tests check a chat's trace where a real collector would receive it (Envoy and the
services export to it over a real socket, with the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), and
`capibara traces` shows traces in a terminal without a collector or Docker. Only the proto
package and grpc are used here, never the OpenTelemetry SDK: what is checked is the wire format.

    async with OtlpReceiver() as receiver:  # port 0: a free one; receiver.endpoint for OTLP
        ...
        spans = await receiver.wait_for(lambda spans: [s for s in spans if s.name == "chat"], 10)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in trace_pb2.Span.SpanKind.items()}
_STATUSES = {value: name.removeprefix("STATUS_CODE_") for name, value in trace_pb2.Status.StatusCode.items()}
# A batch of thousands of spans passes (OTLP exporters send up to 512 a request by default).
_MAX_MESSAGE = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived; ids in lowercase hex, attributes as Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    service: str  # the resource's service.name ("" when it has none)
    resource: dict[str, Any]
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]  # (name, time_unix_nano, attributes)
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    start_unix_nano: int
    end_unix_nano: int
    scope: str  # the instrumentation scope's name

    @property
    def duration_ms(self) -> float:
        return (self.end_unix_nano - self.start_unix_nano) / 1e6

    def event(self, name: str) -> tuple[str, int, dict[str, Any]] | None:
        """The first event called `name`, or None."""
        return next((e for e in self.events if e[0] == name), None)


def value(any_value) -> Any:
    """An OTLP AnyValue as a Python value (a kvlist as a dict; bytes stay bytes)."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind) if kind else None


def attributes(key_values) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in key_values}


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an Export request, with its resource and scope."""
    received = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                events = [(e.name, e.time_unix_nano, attributes(e.attributes)) for e in span.events]
                received.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=_KINDS.get(span.kind, str(span.kind)),
                        service=service,
                        resource=resource,
                        attributes=attributes(span.attributes),
                        events=events,
                        status_code=_STATUSES.get(span.status.code, str(span.status.code)),
                        status_message=span.status.message,
                        start_unix_nano=span.start_time_unix_nano,
                        end_unix_nano=span.end_time_unix_nano,
                        scope=scope_spans.scope.name,
                    )
                )
    return received


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it; `start()` (or `async with`) listens, `stop()` closes."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_spans: Callable[[list[ReceivedSpan]], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.spans: list[ReceivedSpan] = []
        self.requests = 0  # Export calls answered
        self._on_spans = on_spans  # called with each request's spans, on the event loop
        self._by_trace: dict[str, list[ReceivedSpan]] = collections.defaultdict(list)
        self._arrived = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    @classmethod
    async def start(
        cls, host: str = "127.0.0.1", port: int = 0, on_spans: Callable[[list[ReceivedSpan]], None] | None = None
    ) -> OtlpReceiver:
        receiver = cls(host, port, on_spans)
        await receiver._listen()
        return receiver

    async def _listen(self) -> None:
        # Not SO_REUSEPORT (grpc's default): a port another receiver holds is an error, not shared.
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        try:
            self.port = server.add_insecure_port(f"{self._host}:{self.port}")
        except RuntimeError as exc:  # grpc's "Failed to bind": say where
            await server.stop(None)
            raise OSError(f"cannot listen for OTLP on {self.host}:{self.port}: {exc}") from exc
        await server.start()
        self._server = server

    @property
    def _host(self) -> str:  # an IPv6 address in brackets, before a port
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT takes: http://host:port (plaintext gRPC)."""
        return f"http://{self._host}:{self.port}"

    async def stop(self, grace_s: float = 0.2) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        if self._server is None:
            await self._listen()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def Export(self, request, context) -> trace_service_pb2.ExportTraceServiceResponse:
        received = spans_of(request)
        self.requests += 1
        self.spans.extend(received)
        for span in received:
            self._by_trace[span.trace_id].append(span)
        self._arrived.set()
        if self._on_spans is not None and received:
            self._on_spans(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        """The spans of one trace (hex id, any case), in arrival order."""
        return list(self._by_trace.get(trace_id.lower(), ()))

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Every trace so far: its spans by trace id."""
        return {trace_id: list(spans) for trace_id, spans in self._by_trace.items()}

    async def wait_for(self, predicate: Callable[[list[ReceivedSpan]], Any], timeout_s: float) -> Any:
        """`predicate(spans)`'s first truthy result, checked on each arrival; TimeoutError names
        what did arrive, by service and span name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            self._arrived.clear()  # before the check: an arrival after it wakes the wait below
            result = predicate(list(self.spans))
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no expected spans after {timeout_s:g} s; {self.summary()}")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass  # checked once more, then raised above

    def summary(self) -> str:
        """What arrived: `N spans in M requests: service: name ×count, ...`."""
        if not self.spans:
            return f"no spans arrived ({self.requests} requests)"
        counts = collections.Counter((s.service or "?", s.name) for s in self.spans)
        by_service: dict[str, list[str]] = collections.defaultdict(list)
        for (service, name), count in sorted(counts.items()):
            by_service[service].append(name if count == 1 else f"{name} ×{count}")
        listed = "; ".join(f"{service}: {', '.join(names)}" for service, names in by_service.items())
        return f"{len(self.spans)} spans arrived in {self.requests} requests: {listed}"
