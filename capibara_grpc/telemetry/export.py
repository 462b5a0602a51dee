"""Finished spans to an OTLP/gRPC collector, in batches, off the chat's path.

The batching follows the OpenTelemetry SDK's batch span processor and its OTEL_BSP_* settings:
a batch leaves every schedule_delay_ms, or as soon as max_export_batch_size spans wait; beyond
max_queue_size waiting spans, new ones are dropped and counted, never blocking a chat. A batch
that fails is dropped and counted too (the collector being down must not grow the mesh's memory).
Spans are encoded here, per batch, into the collector's own messages (opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from importlib import metadata

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from capibara_grpc import metrics
from capibara_grpc.telemetry.settings import TracingSettings

log = logging.getLogger(__name__)
SCOPE = common_pb2.InstrumentationScope(name="capibara_grpc")
_AnyValue = common_pb2.AnyValue
_KeyValue = common_pb2.KeyValue
# Failures are logged at most this often: a collector that is down would fill the log.
FAILURE_LOG_INTERVAL_S = 60.0


def _value(value) -> common_pb2.AnyValue:
    if isinstance(value, str):
        return _AnyValue(string_value=value)
    if isinstance(value, bool):
        return _AnyValue(bool_value=value)
    if isinstance(value, int):
        return _AnyValue(int_value=value)
    if isinstance(value, float):
        return _AnyValue(double_value=value)
    if isinstance(value, (list, tuple)):
        return _AnyValue(array_value=common_pb2.ArrayValue(values=[_value(v) for v in value]))
    return _AnyValue(string_value=str(value))


def _attributes(attributes: dict) -> list:
    return [_KeyValue(key=key, value=_value(value)) for key, value in attributes.items()]


def _span(span) -> trace_pb2.Span:
    encoded = trace_pb2.Span(
        trace_id=span.trace_id.to_bytes(16, "big"),
        span_id=span.span_id.to_bytes(8, "big"),
        name=span.name,
        kind=span.kind,
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=span.end_ns,
        attributes=_attributes(span.attributes),
        events=[
            trace_pb2.Span.Event(name=name, time_unix_nano=at, attributes=_attributes(attributes))
            for name, at, attributes in span.events
        ],
        flags=0x101 if span.parent_id else 0x100,  # trace flags sampled, and "parent is remote" known
    )
    if span.parent_id:
        encoded.parent_span_id = span.parent_id.to_bytes(8, "big")
    if span.status:
        encoded.status.code = span.status
        encoded.status.message = span.status_message
    return encoded


def _version() -> str:
    try:
        return metadata.version("capibara-mesh")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class SpanExporter:
    """The batch span processor and OTLP/gRPC exporter of one process."""

    def __init__(self, settings: TracingSettings):
        self.settings = settings
        self.pending: list = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub = None
        self._resources: dict[str, resource_pb2.Resource] = {}
        # One instance id per process: every service's spans from here share it.
        self._instance = str(uuid.uuid4())
        self._host = socket.gethostname()
        self._version = _version()
        self._logged_failure_at = -FAILURE_LOG_INTERVAL_S

    def add(self, span) -> None:
        pending = self.pending
        if len(pending) >= self.settings.max_queue_size:
            metrics.TRACE_SPANS.labels("dropped").inc()
            return
        pending.append(span)
        if len(pending) == self.settings.max_export_batch_size:
            self._wake.set()

    def start(self) -> None:
        settings = self.settings
        if settings.tls:
            self._channel = grpc.aio.secure_channel(settings.target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.aio.insecure_channel(settings.target)
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._task = asyncio.create_task(self._run(), name="span exporter")

    async def _run(self) -> None:
        delay_s = self.settings.schedule_delay_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), delay_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything waiting, a batch at a time."""
        while self.pending:
            size = self.settings.max_export_batch_size
            batch, self.pending = self.pending[:size], self.pending[size:]
            await self._export(batch)

    async def _export(self, batch: list) -> None:
        try:
            request = self.encode(batch)
            await self._stub.Export(
                request, timeout=self.settings.export_timeout_ms / 1000, metadata=self.settings.headers or None
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a collector that fails must never fail the mesh
            metrics.TRACE_SPANS.labels("failed").inc(len(batch))
            now = time.monotonic()
            if now - self._logged_failure_at >= FAILURE_LOG_INTERVAL_S:
                self._logged_failure_at = now
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                log.warning(
                    "could not export %d spans to the OTLP collector at %s (%s); spans are dropped until it answers",
                    len(batch),
                    self.settings.target,
                    reason,
                )
            return
        metrics.TRACE_SPANS.labels("exported").inc(len(batch))

    def encode(self, batch: list) -> trace_service_pb2.ExportTraceServiceRequest:
        """One ResourceSpans per service: each carries its own service.name."""
        by_service: dict[str, list] = {}
        for span in batch:
            by_service.setdefault(span.service, []).append(_span(span))
        return trace_service_pb2.ExportTraceServiceRequest(
            resource_spans=[
                trace_pb2.ResourceSpans(
                    resource=self._resource(service), scope_spans=[trace_pb2.ScopeSpans(scope=SCOPE, spans=spans)]
                )
                for service, spans in by_service.items()
            ]
        )

    def _resource(self, service: str) -> resource_pb2.Resource:
        resource = self._resources.get(service)
        if resource is None:
            attributes = {
                "service.name": self.settings.service_name(service),
                "service.namespace": self.settings.service_name_prefix,
                "service.version": self._version,
                "service.instance.id": self._instance,
                "host.name": self._host,
                "process.pid": os.getpid(),
                "telemetry.sdk.name": "capibara_grpc",
                "telemetry.sdk.language": "python",
                "telemetry.sdk.version": self._version,
                **dict(self.settings.resource_attributes),
            }
            resource = self._resources[service] = resource_pb2.Resource(attributes=_attributes(attributes))
        return resource

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is waiting (for at most `timeout_s`), then close."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            pass
        if self._channel is not None:
            await self._channel.close()
