"""Finished spans to an OTLP/gRPC collector, in batches, off the chat's path.

The batching follows the OpenTelemetry SDK's batch span processor and its OTEL_BSP_* settings:
a batch leaves every schedule_delay_ms, or as soon as max_export_batch_size spans wait; beyond
max_queue_size waiting spans, new ones are dropped and counted, never blocking a chat. A batch
that fails is dropped and counted too (the collector being down must not grow the mesh's memory).
Spans are encoded here, per batch, into the collector's ExportTraceServiceRequest (wire.py), and
sent with the collector's TraceService/Export method (opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from capibara_grpc import metrics
from capibara_grpc.telemetry import wire
from capibara_grpc.telemetry.settings import TracingSettings, mesh_version

log = logging.getLogger(__name__)
SCOPE = "capibara_grpc"
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# Failures are logged at most this often: a collector that is down would fill the log.
FAILURE_LOG_INTERVAL_S = 60.0


class SpanExporter:
    """The batch span processor and OTLP/gRPC exporter of one process."""

    def __init__(self, settings: TracingSettings):
        self.settings = settings
        self.pending: list[tuple[str, bytes]] = []  # (service, encoded span)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._send = None  # the collector's Export method
        self._heads: dict[str, tuple[bytes, bytes]] = {}
        # One instance id per process: every service's spans from here share it.
        self._instance = str(uuid.uuid4())
        self._host = socket.gethostname()
        self._version = mesh_version()
        self._logged_failure_at = -FAILURE_LOG_INTERVAL_S

    def add(self, span) -> None:
        """A finished span, encoded at once: waiting as bytes (which the garbage collector never
        scans), not as objects, it costs the process nothing until it leaves. Measured: thousands
        of waiting span objects made every collection slower, about 40 us a chat at 100 %."""
        pending = self.pending
        if len(pending) >= self.settings.max_queue_size:
            metrics.TRACE_SPANS.labels("dropped").inc()
            return
        pending.append((span.service, wire.span(span)))
        if len(pending) == self.settings.max_export_batch_size:
            self._wake.set()

    def start(self) -> None:
        settings = self.settings
        if settings.tls:
            self._channel = grpc.aio.secure_channel(settings.target, grpc.ssl_channel_credentials())
        else:
            self._channel = grpc.aio.insecure_channel(settings.target)
        # The request is already bytes (wire.py): sent as they are.
        self._send = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        self._task = asyncio.create_task(self._run(), name="span exporter")

    async def _run(self) -> None:
        delay_s = self.settings.schedule_delay_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), delay_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - the exporter must outlive a bug in one batch
                log.exception("span export failed")
                self.pending.clear()

    async def flush(self) -> None:
        """Send what waits now, a batch at a time. Spans that end meanwhile wait for the next
        flush: taking them too would send a trickle of tiny batches without end under load
        (measured: one export per chat, and the collector's CPU with it)."""
        waiting, self.pending = self.pending, []
        size = self.settings.max_export_batch_size
        for start in range(0, len(waiting), size):
            await self._export(waiting[start : start + size])

    async def _export(self, batch: list) -> None:
        try:
            request = self.encode(batch)
            await self._send(
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

    def encode(self, batch: list[tuple[str, bytes]]) -> bytes:
        """An ExportTraceServiceRequest of (service, encoded span) pairs: one ResourceSpans per
        service, each with its own service.name."""
        by_service: dict[str, list[bytes]] = {}
        for service, encoded in batch:
            by_service.setdefault(service, []).append(encoded)
        return wire.export_request([(self._head(service), spans) for service, spans in by_service.items()])

    def _head(self, service: str) -> tuple[bytes, bytes]:
        head = self._heads.get(service)
        if head is None:
            attributes = {
                "service.name": self.settings.service_name(service),
                "service.instance.id": self._instance,
                "host.name": self._host,
                "process.pid": os.getpid(),
                "telemetry.sdk.name": "capibara_grpc",
                "telemetry.sdk.language": "python",
                "telemetry.sdk.version": self._version,
                **self.settings.resource(),
            }
            head = self._heads[service] = wire.resource_spans_head(attributes, SCOPE, self._version)
        return head

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
