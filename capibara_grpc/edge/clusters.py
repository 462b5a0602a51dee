"""Envoy clusters: a service's replicas (gRPC, health-checked with grpc.health.v1) and a model's
servers (HTTP, /health), each with outlier detection and circuit breakers; and the OpenTelemetry
collector Envoy sends its spans to, when tracing is on."""

from __future__ import annotations

import ipaddress
import os
import ssl

from capibara_grpc.config import url_host_port
from capibara_grpc.stubs import SERVICE_FULL_NAMES


def socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(name: str, addresses: list[tuple[str, int]], health_check: dict, gateway_failures: int, **extra) -> dict:
    """Least requests over `addresses`, each health-checked every 2 s (`health_check` says how) and
    ejected for a while after `gateway_failures` connection errors or 503s in a row, or 5 5xx."""
    return {
        "name": name,
        # Replicas may be named by host name (another machine, a Kubernetes Service).
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "no_traffic_interval": "2s",
                **health_check,
            }
        ],
        "outlier_detection": {
            "consecutive_gateway_failure": gateway_failures,
            "consecutive_5xx": 5,
            "interval": "2s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 100,
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096, "max_retries": 64}
            ]
        },
        **extra,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(h, p)}} for h, p in addresses]}],
        },
    }


def _http2() -> dict:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def service_cluster(name: str, addresses: list[tuple[str, int]]) -> dict:
    """A service's replicas (usually one), over HTTP/2. Health is the service's own
    grpc.health.v1: a replica that says NOT_SERVING (or does not answer) gets no new calls. With
    every replica down Envoy still tries them (panic mode), so callers get the service's own error
    instead of a bare "no healthy upstream"."""
    http2 = _http2()
    health_check = {"grpc_health_check": {"service_name": SERVICE_FULL_NAMES[name]}}
    return _cluster(name, addresses, health_check, 3, typed_extension_protocol_options=http2)


def model_cluster(model_id: str, urls: list[str]) -> dict:
    """A model's servers (llama-server, vLLM), over HTTP/1.1, checked with GET /health."""
    addresses = [url_host_port(url) for url in urls]
    return _cluster(f"model-{model_id}", addresses, {"http_health_check": {"path": "/health"}}, 2)


def mcp_cluster(addresses: list[tuple[str, int]]) -> dict:
    """The gateways' MCP over Streamable HTTP (HTTP/1.1, uvicorn), checked with GET /health."""
    return _cluster("mcp", addresses, {"http_health_check": {"path": "/health"}}, 2)


# Where Envoy's OpenTelemetry tracer sends its spans (edge/tracing.py renders it when tracing is on).
COLLECTOR_CLUSTER = "opentelemetry_collector"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ca_bundle() -> str:
    """The system's trusted CAs as one file (Envoy's system_root_certs is not supported on Linux):
    OpenSSL's default, /etc/ssl/certs/ca-certificates.crt on Debian, Ubuntu (Envoy's image), Alpine."""
    cafile = ssl.get_default_verify_paths().cafile
    return cafile if cafile and os.path.isfile(cafile) else "/etc/ssl/certs/ca-certificates.crt"


def collector_cluster(host: str, port: int, tls: bool) -> dict:
    """The OTLP/gRPC collector (HTTP/2), at the host and port of tracing.endpoint: over TLS when the
    endpoint is https://, checked against the system's trusted CAs and the collector's host name
    (Envoy checks a certificate's names only when told which to expect). No health checks: a
    collector that is down costs only the spans it would have received."""
    is_ip = _is_ip(host)
    cluster = {
        "name": COLLECTOR_CLUSTER,
        # A name is resolved (and re-resolved) by DNS; an address literal, v4 or v6, is used as is.
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http2(),
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}],
        },
    }
    if tls:
        validation = {
            "trusted_ca": {"filename": _ca_bundle()},
            "match_typed_subject_alt_names": [
                {"san_type": "IP_ADDRESS" if is_ip else "DNS", "matcher": {"exact": host}}
            ],
        }
        context = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": validation},
        }
        if not is_ip:  # SNI carries host names only (RFC 6066)
            context["sni"] = host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": context}
    return cluster
