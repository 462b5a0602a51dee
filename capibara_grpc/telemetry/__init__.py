"""OpenTelemetry traces of the mesh: settings (settings.py), spans (spans.py), client spans on
the channels between services (channel.py), the model call's GenAI span (genai.py), export over
OTLP/gRPC (export.py), and a receiver that shows traces (receiver.py). docs/tracing.md says what a
trace holds and how to open one."""

from __future__ import annotations

import logging
import typing

from capibara_grpc.telemetry import spans

if typing.TYPE_CHECKING:  # settings.py reads the config's schema, which imports errors.py, which imports this
    from capibara_grpc.telemetry.settings import TracingSettings

log = logging.getLogger(__name__)


async def install(settings: TracingSettings, default_service: str):
    """Trace this process with `settings` (spans with no server span above them belong to
    `default_service`); returns the coroutine function that flushes and stops it, or None when
    tracing is off."""
    if not settings.enabled:
        spans.TRACER = None
        return None
    from capibara_grpc.telemetry.export import SpanExporter  # imports the OTLP protos only when on

    exporter = SpanExporter(settings)
    exporter.start()
    spans.TRACER = spans.Tracer(settings, exporter, default_service)
    log.info(
        "tracing to the OTLP collector at %s (%s, sampler %s)",
        settings.target,
        "TLS" if settings.tls else "plaintext",
        settings.sampler + (f" {settings.ratio:g}" if "ratio" in settings.sampler else ""),
    )

    async def uninstall() -> None:
        spans.TRACER = None
        await exporter.shutdown()

    return uninstall
