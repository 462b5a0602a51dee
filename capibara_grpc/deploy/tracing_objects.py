"""The traces half of the Kubernetes manifests: an OpenTelemetry Collector that every mesh pod
sends its spans to, Jaeger behind it as the trace viewer, and the OTEL_* environment that points
each mesh container (every service and Envoy) at the collector.

Tracing is on in the generated manifests, whatever `tracing.endpoint` says in the config: that
endpoint names a collector as seen from the machine that runs `capibara up` (127.0.0.1:4317, or a
hosted one with its key), which means nothing inside the cluster, while the manifests ship their
own collector, so the one endpoint that works in a pod is that collector's. Which chats are traced
still follows the config (`tracing.sampler`, `sampler_arg`: `always_off` keeps the mesh silent),
and where the spans go after the collector is the collector's configuration: Jaeger here, or a
hosted backend whose API key comes from a Secret (NOTES).
"""

from __future__ import annotations

import urllib.parse

import yaml

from capibara_grpc.config.schema import TracingConfig
from capibara_grpc.deploy.objects import COLLECTOR_IMAGE, JAEGER_IMAGE, NAMESPACE, meta, selector

COLLECTOR = "otel-collector"
JAEGER = "jaeger"
OTLP_GRPC_PORT = 4317
OTLP_HTTP_PORT = 4318
JAEGER_UI_PORT = 16686
HEALTH_PORT = 13133  # the collector's health_check, Jaeger's healthcheckv2
# The Service's name, resolved in the pod's own namespace (an overlay that renames it keeps working).
COLLECTOR_ENDPOINT = f"http://{COLLECTOR}:{OTLP_GRPC_PORT}"
# A hosted backend's key, which the operator puts in this Secret; the collector reads it as an
# environment variable, and no manifest holds it.
BACKEND_SECRET = "trace-backend"
BACKEND_KEY_ENV = "TRACE_BACKEND_API_KEY"
# Resource attributes from the downward API: (attribute, variable, field of the pod).
DOWNWARD = (
    ("k8s.namespace.name", "K8S_NAMESPACE_NAME", "metadata.namespace"),
    ("k8s.pod.name", "K8S_POD_NAME", "metadata.name"),
    ("k8s.pod.uid", "K8S_POD_UID", "metadata.uid"),
    ("k8s.node.name", "K8S_NODE_NAME", "spec.nodeName"),
)
NON_ROOT = {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False}

NOTES = {
    f"{COLLECTOR}.yaml": f"""\
# The OpenTelemetry Collector. Every mesh pod (each service and Envoy) sends its spans here over
# OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT={COLLECTOR_ENDPOINT}; OTLP/HTTP on {OTLP_HTTP_PORT}); it batches them
# and exports them to Jaeger (jaeger.yaml), logging one line per batch:
#   kubectl -n {NAMESPACE} logs deploy/{COLLECTOR}
# Another backend (a hosted one): put its API key in a Secret, never in a manifest,
#   kubectl -n {NAMESPACE} create secret generic {BACKEND_SECRET} --from-literal=api-key=...
# (the collector reads it as ${{env:{BACKEND_KEY_ENV}}}), and replace this ConfigMap from an overlay
# (configMapGenerator: name {COLLECTOR}-config, namespace {NAMESPACE}, behavior: replace, files: [config.yaml])
# with a config whose exporter is `otlp: {{endpoint: <backend>:443, headers: {{<header>: ${{env:{BACKEND_KEY_ENV}}}}}}}`
# (deploy/kubernetes/README.md).
""",
    f"{JAEGER}.yaml": f"""\
# Jaeger v2 (all-in-one, spans kept in memory: lost when the pod restarts), the collector's trace
# backend. Open it:
#   kubectl -n {NAMESPACE} port-forward svc/{JAEGER} {JAEGER_UI_PORT}
# then http://localhost:{JAEGER_UI_PORT} (services capibara-envoy, capibara-gateway, ...). Its Service is
# ClusterIP and only the collector may reach it (network-policies.yaml); port-forward needs no rule.
""",
}


def mesh_env(tracing: TracingConfig, deployment: str) -> list[dict]:
    """The OTEL_* variables of a mesh container: the collector, the service name prefix (each
    process adds its own name: capibara-gateway), the sampler, and resource attributes naming the
    pod. The downward API's variables come first: $(NAME) expands only to a variable above it."""
    attributes = [f"{attribute}=$({variable})" for attribute, variable, _ in DOWNWARD]
    attributes.append(f"k8s.deployment.name={deployment}")
    attributes += [f"{key}={urllib.parse.quote(value, safe='')}" for key, value in tracing.resource_attributes.items()]
    return [
        *({"name": variable, "valueFrom": {"fieldRef": {"fieldPath": field}}} for _, variable, field in DOWNWARD),
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": tracing.endpoint},
        {"name": "OTEL_SERVICE_NAME", "value": tracing.service_name_prefix},
        {"name": "OTEL_TRACES_SAMPLER", "value": tracing.sampler},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(tracing.sampler_arg)},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": ",".join(attributes)},
    ]


def _collector_config() -> dict:
    everywhere = "0.0.0.0"  # the collector listens on localhost unless told
    return {
        "extensions": {"health_check": {"endpoint": f"{everywhere}:{HEALTH_PORT}"}},
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": f"{everywhere}:{OTLP_GRPC_PORT}"},
                    "http": {"endpoint": f"{everywhere}:{OTLP_HTTP_PORT}"},
                }
            }
        },
        "processors": {
            "memory_limiter": {"check_interval": "1s", "limit_percentage": 80, "spike_limit_percentage": 25},
            "batch": {},
        },
        "exporters": {
            "otlp/jaeger": {"endpoint": f"{JAEGER}:{OTLP_GRPC_PORT}", "tls": {"insecure": True}},
            # One line per batch (its span count) in the collector's log: traces are arriving.
            "debug": {"verbosity": "basic"},
        },
        "service": {
            "extensions": ["health_check"],
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["memory_limiter", "batch"],
                    "exporters": ["otlp/jaeger", "debug"],
                }
            },
        },
    }


def _deployment(name: str, container: dict, volumes: list[dict]) -> dict:
    pod = {"containers": [container], **({"volumes": volumes} if volumes else {})}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, "tracing"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(name)},
            "template": {
                "metadata": {"labels": meta(name, "tracing")["labels"]},
                "spec": pod,
            },
        },
    }


def _service(name: str, ports: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, "tracing"),
        "spec": {"type": "ClusterIP", "selector": selector(name), "ports": ports},
    }


def _otlp_ports(key: str) -> list[dict]:
    return [
        {"name": "otlp-grpc", key: OTLP_GRPC_PORT, **({"appProtocol": "grpc"} if key == "port" else {})},
        {"name": "otlp-http", key: OTLP_HTTP_PORT},
    ]


def collector() -> list[dict]:
    container = {
        "name": COLLECTOR,
        "image": COLLECTOR_IMAGE,
        "args": ["--config=/etc/otelcol-contrib/config.yaml"],
        "ports": [*_otlp_ports("containerPort"), {"name": "health", "containerPort": HEALTH_PORT}],
        "env": [
            {
                "name": BACKEND_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": BACKEND_SECRET, "key": "api-key", "optional": True}},
            }
        ],
        "readinessProbe": {"httpGet": {"path": "/", "port": "health"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/", "port": "health"}, "initialDelaySeconds": 15},
        # memory_limiter keeps the collector under 80 % of this limit by refusing spans.
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/otelcol-contrib", "readOnly": True}],
        "securityContext": NON_ROOT,
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(f"{COLLECTOR}-config", "tracing"),
            "data": {"config.yaml": yaml.safe_dump(_collector_config(), sort_keys=False)},
        },
        _deployment(COLLECTOR, container, [{"name": "config", "configMap": {"name": f"{COLLECTOR}-config"}}]),
        _service(COLLECTOR, [{**port, "targetPort": port["name"]} for port in _otlp_ports("port")]),
    ]


def jaeger() -> list[dict]:
    container = {
        "name": JAEGER,
        "image": JAEGER_IMAGE,  # no --config: the all-in-one default, OTLP in, memory storage
        "env": [{"name": "JAEGER_LISTEN_HOST", "value": "0.0.0.0"}],
        "ports": [
            {"name": "otlp-grpc", "containerPort": OTLP_GRPC_PORT},
            {"name": "ui", "containerPort": JAEGER_UI_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
        ],
        "readinessProbe": {"httpGet": {"path": "/status", "port": "health"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/status", "port": "health"}, "initialDelaySeconds": 15},
        # The default keeps up to 100,000 traces in memory.
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": NON_ROOT,
    }
    ports = [
        {"name": "otlp-grpc", "port": OTLP_GRPC_PORT, "targetPort": "otlp-grpc", "appProtocol": "grpc"},
        {"name": "ui", "port": JAEGER_UI_PORT, "targetPort": "ui"},
    ]
    return [_deployment(JAEGER, container, []), _service(JAEGER, ports)]


def network_policies(policy) -> list[dict]:
    """The collector takes spans from the mesh's pods (services and Envoy); Jaeger from the
    collector only. `policy(name, pod selector, sources, ports)` is kubernetes.py's."""
    mesh = [{"podSelector": {"matchLabels": {"capibara/component": c}}} for c in ("service", "edge")]
    from_collector = [{"podSelector": {"matchLabels": selector(COLLECTOR)}}]
    return [
        policy(f"{COLLECTOR}-from-mesh", selector(COLLECTOR), mesh, [OTLP_GRPC_PORT, OTLP_HTTP_PORT]),
        policy(f"{JAEGER}-from-{COLLECTOR}", selector(JAEGER), from_collector, [OTLP_GRPC_PORT]),
    ]
