"""Envoy's own OpenTelemetry tracer, as envoy_config.build adds it to the bootstrap when tracing is on
(`tracing:` in the config, the OTEL_* variables winning): on every HTTP connection manager (the
edge and the mesh's internal listeners) a `tracing` block with the tracer's exporter, service name,
resource and sampler, and a request id extension that keeps Envoy's x-request-id out of the
sampling decision; the collector's cluster (clusters.collector_cluster); and a static runtime layer
that sets how often Envoy flushes its finished spans. Envoy's span is the edge's hop in each chat's
trace, the parent of the gateway's. With tracing off, or while the exporter needs headers (never
written into Envoy's files; see `envoy_traces`), the bootstrap is left exactly as it is.
"""

from __future__ import annotations

import functools
import logging

from capibara_grpc.edge.clusters import COLLECTOR_CLUSTER, collector_cluster
from capibara_grpc.telemetry.settings import TracingSettings

log = logging.getLogger(__name__)


# Envoy's OpenTelemetry tracer, as Envoy 1.40.0 runs it (measured: a real Envoy and OTLP receiver):
# - Envoy's own decision comes first: a request it decides not to trace gets an unsampled span even
#   under a sampled traceparent. That decision reads x-request-id: random_sampling below 100 drops
#   sampled callers, and a client's own x-request-id that is no UUID drops its request. So it is not
#   used (every request "traced", random_sampling unread) and the OpenTelemetry sampler decides:
#   parent_based(trace_id_ratio_based), a caller's sampled flag honoured, is parentbased_traceidratio.
# - Envoy's span is the child of the traceparent's (same trace id), and the traceparent sent
#   upstream names it; tracestate passes on. No CLIENT span per attempt upstream
#   (spawn_upstream_span): the gateway's SERVER span times the same call, and a second Envoy span a
#   chat cost ~25 us of Envoy's CPU (benchmarks/tracing_cost.py).
# - Finished spans wait in each worker until `tracing.opentelemetry.min_flush_spans` wait or every
#   `tracing.opentelemetry.flush_interval_ms` (runtime keys, default 5 and 5000; not
#   stats_flush_interval): OTEL_BSP_MAX_EXPORT_BATCH_SIZE and OTEL_BSP_SCHEDULE_DELAY set them.
_OTEL = "envoy.tracers.opentelemetry"
_OTEL_TYPES = "type.googleapis.com/envoy.extensions.tracers.opentelemetry"
_HCM = "envoy.filters.network.http_connection_manager"


def envoy_traces(settings: TracingSettings) -> bool:
    """Whether Envoy gets a tracer: not while the exporter needs headers. They are often a hosted
    backend's API key, and no secret is ever written into Envoy's files (a GrpcService cannot read
    one from the environment). Such a backend would refuse Envoy's spans, which the services' spans
    name as their parents, leaving a hole in every trace; with no tracer Envoy passes the client's
    traceparent on untouched and the trace stays whole. For Envoy's spans too, run an OpenTelemetry
    Collector beside the mesh that adds the headers, and point the mesh at it."""
    if settings.enabled and settings.headers:
        _warn_headers(", ".join(sorted({name for name, _ in settings.headers})))
    return settings.enabled and not settings.headers


@functools.cache
def _warn_headers(names: str) -> None:
    log.warning(
        "tracing: Envoy traces nothing: the exporter's headers (%s) are never written into Envoy's "
        "config; to trace Envoy too, point the mesh at an OpenTelemetry Collector that adds them",
        names,
    )


def _sampler(settings: TracingSettings, follow_parent: bool) -> dict:
    root = {
        "name": f"{_OTEL}.samplers.trace_id_ratio_based",
        "typed_config": {
            "@type": f"{_OTEL_TYPES}.samplers.v3.TraceIdRatioBasedSamplerConfig",
            "sampling_percentage": {"numerator": round(settings.root_ratio * 1_000_000), "denominator": "MILLION"},
        },
    }
    if not follow_parent:
        return root
    return {
        "name": f"{_OTEL}.samplers.parent_based",
        "typed_config": {"@type": f"{_OTEL_TYPES}.samplers.v3.ParentBasedSamplerConfig", "wrapped_sampler": root},
    }


def _resource(settings: TracingSettings) -> list[dict]:
    """The detectors of Envoy's resource (service.name is the tracer's own): the file's attributes
    and OTEL_RESOURCE_ATTRIBUTES as resolved here, then the variable as Envoy's own process has it
    (a pod's, say), which wins. While it is unset, Envoy logs a warning when it starts (capibara up
    sets it: launch_commands.envoy_env)."""
    detectors = f"{_OTEL_TYPES}.resource_detectors.v3"
    return [
        {
            "name": f"{_OTEL}.resource_detectors.static_config",
            "typed_config": {
                "@type": f"{detectors}.StaticConfigResourceDetectorConfig",
                "attributes": settings.resource(),
            },
        },
        {
            "name": f"{_OTEL}.resource_detectors.environment",
            "typed_config": {"@type": f"{detectors}.EnvironmentResourceDetectorConfig"},
        },
    ]


def _tracing(settings: TracingSettings, listener: str) -> dict:
    """HttpConnectionManager.tracing of one listener. The edge samples as `tracing.sampler` says; the
    mesh's own listeners always follow their caller, a service that has applied it already. (Envoy's
    ratio reads other bits of the trace id than the SDKs' do: under plain traceidratio the edge and
    the gateway may decide differently for one chat; the parentbased_* samplers never do.)"""
    return {
        "random_sampling": {"value": 100},  # unread (see above); the sampler decides
        "spawn_upstream_span": False,
        # Formatted when the span ends: by then a REST call's path is its gRPC method's.
        "operation": "%REQ(:METHOD)% %PATH(NQ:PATH)%",
        "provider": {
            "name": _OTEL,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {
                    "envoy_grpc": {
                        "cluster_name": COLLECTOR_CLUSTER,
                        "authority": f"[{settings.host}]" if ":" in settings.host else settings.host,
                    },
                    "timeout": f"{settings.export_timeout_ms / 1000:g}s",
                },
                "service_name": settings.service_name("envoy"),
                "resource_detectors": _resource(settings),
                "sampler": _sampler(settings, follow_parent=settings.parent_based or listener != "edge"),
                # Beyond this many spans waiting, new ones are dropped (tracing.opentelemetry.spans_dropped).
                "max_cache_size": settings.max_queue_size,
            },
        },
    }


def trace(bootstrap: dict, settings: TracingSettings) -> dict:
    """`bootstrap` with Envoy's tracer on every HTTP connection manager, and the collector's cluster."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for hcm in (f["typed_config"] for f in chain["filters"] if f["name"] == _HCM):
                hcm["tracing"] = _tracing(settings, listener["name"])
                hcm["request_id_extension"] = {
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                        "use_request_id_for_trace_sampling": False,
                    }
                }
    bootstrap["static_resources"]["clusters"].append(collector_cluster(settings.host, settings.port, settings.tls))
    flush = {
        "tracing.opentelemetry.flush_interval_ms": settings.schedule_delay_ms,
        "tracing.opentelemetry.min_flush_spans": settings.max_export_batch_size,
    }
    # A static layer only: as without a runtime, the admin port has no /runtime_modify.
    runtime = {"layers": [{"name": "static", "static_layer": flush}]}
    return {"admin": bootstrap.pop("admin"), "layered_runtime": runtime, **bootstrap}
