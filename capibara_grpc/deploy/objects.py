"""What every generated Kubernetes object shares: namespace, images, paths, resources, metadata."""

from __future__ import annotations

NAMESPACE = "capibara"
IMAGE = "ghcr.io/capibara-mesh/capibara:latest"  # built from deploy/Dockerfile
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
LLAMA_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
VLLM_IMAGE = "vllm/vllm-openai:latest"
# Traces (tracing_objects.py): pinned, since a collector's config keys change between releases.
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.150.1"
JAEGER_IMAGE = "jaegertracing/jaeger:2.17.0"  # Jaeger v2: one binary, OTLP in, UI on 16686
CONFIG_PATH = "/etc/capibara/capibara.yaml"
KEYS_PATH = "/etc/capibara/api-keys/keys"
MODEL_PORT = 8080
# Requests and limits per service: the router and consensus hold the sentence encoder.
RESOURCES = {
    "router": ({"cpu": "500m", "memory": "1Gi"}, {"memory": "2Gi"}),
    "consensus": ({"cpu": "250m", "memory": "1Gi"}, {"memory": "2Gi"}),
    "gateway": ({"cpu": "250m", "memory": "1Gi"}, {"memory": "2Gi"}),
}
DEFAULT_RESOURCES = ({"cpu": "100m", "memory": "256Mi"}, {"memory": "1Gi"})


def meta(name: str, component: str, **extra) -> dict:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/part-of": "capibara",
            "capibara/component": component,
        },
        **extra,
    }


def selector(name: str) -> dict:
    return {"app.kubernetes.io/name": name}
