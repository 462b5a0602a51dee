"""Kubernetes manifests (a kustomize base) generated from the mesh configuration.

Why kustomize and not Helm: the manifests are generated from the same mesh config as the local
Envoy config, so a values layer would be a second source of truth; plain YAML in a kustomize base
is what `kubectl apply -k` reads, diffs well, and overlays (replicas, images, GPU nodes) patch it.

It ships an OpenTelemetry Collector and Jaeger, and every mesh pod sends its traces there
(tracing_objects.py). `capibara k8s` writes deploy/kubernetes/base; a test validates every manifest against the
Kubernetes schemas (kubernetes-validate) and checks the committed files match the config.
"""

from __future__ import annotations

import base64
import copy
import pathlib

import yaml

from capibara_grpc.config import MeshConfig
from capibara_grpc.config.mcp_endpoint import http_port as mcp_http_port
from capibara_grpc.config.parsing import as_data
from capibara_grpc.deploy import tracing_objects
from capibara_grpc.deploy.model_servers import model_deployment
from capibara_grpc.deploy.objects import (
    CONFIG_PATH,
    DEFAULT_RESOURCES,
    ENVOY_IMAGE,
    IMAGE,
    KEYS_PATH,
    MODEL_PORT,
    NAMESPACE,
    RESOURCES,
    meta,
    selector,
)
from capibara_grpc.edge import descriptor, envoy_config
from capibara_grpc.stubs import SERVICE_FULL_NAMES


def pod_config(config: MeshConfig) -> MeshConfig:
    """The mesh config the pods read: services listen on every interface, reach each other
    through the envoy-mesh Service, models by their Services, memory and cache shared."""
    pods = copy.deepcopy(config)
    pods.services.host = "0.0.0.0"
    pods.edge.mesh_address = "envoy-mesh"
    pods.state_dir = "/var/lib/capibara"
    for model in pods.models.values():
        if model.launch is not None or model.backend.url.startswith("http://127.0.0.1"):
            model.backend.url = f"http://model-{model.model_id}:{MODEL_PORT}"
        model.backend.replicas = []  # in Kubernetes the model's Service balances its pods
        model.launch = None
    if not pods.context.database.startswith("postgres"):
        pods.context.database = "postgresql://capibara@postgres:5432/capibara"
    pods.cache.backend = "redis"
    pods.cache.redis_url = "redis://redis:6379/0"
    pods.edge.api_keys_file = ""
    # Traces go to the collector the manifests ship, which needs no key (tracing_objects says why).
    pods.tracing.endpoint = tracing_objects.COLLECTOR_ENDPOINT
    pods.tracing.headers = {}
    return pods


def _config_yaml(pods: MeshConfig) -> str:
    data = as_data(pods)
    for model in data["models"].values():
        model.pop("launch", None)
    return yaml.safe_dump(data, sort_keys=False)


def _mcp_ports(config: MeshConfig, service: str, key: str) -> list[dict]:
    """The gateway's pods also serve MCP over HTTP, which Envoy's /mcp route reaches."""
    return [{"name": "mcp", key: mcp_http_port(config)}] if service == "gateway" else []


# The services that call model servers (chats; token counts), and so need their keys.
MODEL_CALLERS = ("inference", "context")
MODEL_KEYS_SECRET = "capibara-model-keys"


def model_secret_names(config: MeshConfig) -> list[str]:
    """The environment variables the models' backends read (api_key_env, ${NAME} in headers)."""
    return sorted({name for model in config.models.values() for name in model.backend.env_names})


def _service_deployment(config: MeshConfig, service: str) -> list[dict]:
    endpoint = config.services.endpoint(service)
    requests, limits = RESOURCES.get(service, DEFAULT_RESOURCES)
    probe = {"grpc": {"port": endpoint.port, "service": SERVICE_FULL_NAMES[service]}, "periodSeconds": 5}
    container = {
        "name": service,
        "image": IMAGE,
        "args": ["--config", CONFIG_PATH, "serve", service],
        "ports": [
            {"name": "grpc", "containerPort": endpoint.port},
            {"name": "metrics", "containerPort": endpoint.metrics},
            *_mcp_ports(config, service, "containerPort"),
        ],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 30, "failureThreshold": 6},
        "startupProbe": {**probe, "failureThreshold": 60},
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/capibara"},
            {"name": "state", "mountPath": "/var/lib/capibara"},
        ],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    container["env"] = tracing_objects.mesh_env(config.tracing, service)
    if service in MODEL_CALLERS and (names := model_secret_names(config)):
        # Each variable from the Secret MODEL_KEYS_SECRET, which the operator creates: the keys
        # are never in the manifests (kubectl create secret generic capibara-model-keys --from-literal=NAME=...).
        container["env"] += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": MODEL_KEYS_SECRET, "key": name}}} for name in names
        ]
    replicas = 1 if service == "speech" else 2
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(service, "service"),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector(service)},
                "template": {
                    "metadata": {"labels": meta(service, "service")["labels"]},
                    "spec": {
                        "containers": [container],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "capibara-config"}},
                            {"name": "state", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(service, "service"),
            "spec": {
                "selector": selector(service),
                "ports": [
                    {"name": "grpc", "port": endpoint.port, "targetPort": "grpc", "appProtocol": "grpc"},
                    {"name": "metrics", "port": endpoint.metrics, "targetPort": "metrics"},
                    *_mcp_ports(config, service, "port"),
                ],
            },
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta(service, "service"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service},
                "minReplicas": replicas,
                "maxReplicas": 10,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                    }
                ],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(service, "service"),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(service)}},
        },
    ]


def _envoy(config: MeshConfig, pods: MeshConfig) -> list[dict]:
    def dns(service: str) -> list[tuple[str, int]]:
        return [(f"{service}.{NAMESPACE}.svc.cluster.local", pods.services.endpoint(service).port)]

    bootstrap = envoy_config.build(
        pods,
        pathlib.Path("/etc/envoy/descriptor/capibara.pb"),
        pathlib.Path("/etc/envoy/tls/tls.crt"),
        pathlib.Path("/etc/envoy/tls/tls.key"),
        keys_file=KEYS_PATH,
        addresses=dns,
        bind_all=True,
        environ={},  # the manifests follow the config, never the OTEL_* of the shell that generates them
    )
    _point_static_files_at(bootstrap)
    ports = [("edge", pods.edge.port), ("mesh", pods.edge.mesh_port)]
    container = {
        "name": "envoy",
        "image": ENVOY_IMAGE,
        "args": ["-c", "/etc/envoy/envoy.yaml", "--log-level", "warn"],
        "ports": [{"name": name, "containerPort": port} for name, port in ports],
        "env": tracing_objects.mesh_env(pods.tracing, "envoy"),
        "readinessProbe": {"httpGet": {"path": "/ready", "port": pods.edge.admin_port}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/envoy"},
            {"name": "descriptor", "mountPath": "/etc/envoy/descriptor"},
            {"name": "web", "mountPath": "/etc/envoy/web"},
            {"name": "tls", "mountPath": "/etc/envoy/tls", "readOnly": True},
            {"name": "api-keys", "mountPath": "/etc/capibara/api-keys", "readOnly": True},
        ],
    }
    volumes = [
        {"name": "config", "configMap": {"name": "envoy-config"}},
        {"name": "descriptor", "configMap": {"name": "envoy-descriptor"}},
        {"name": "web", "configMap": {"name": "envoy-web"}},
        {"name": "tls", "secret": {"secretName": "edge-tls"}},
        # API keys: `kubectl create secret generic capibara-api-keys --from-file=keys=./api-keys.txt`
        {"name": "api-keys", "secret": {"secretName": "capibara-api-keys", "optional": True}},
    ]
    web_files = {path.name: path.read_text() for path in sorted(envoy_config.WEB.iterdir()) if path.is_file()}
    web_files["openapi.json"] = envoy_config.OPENAPI_DOCUMENT.read_text()
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("envoy-config", "edge"),
            "data": {"envoy.yaml": yaml.safe_dump(bootstrap, sort_keys=False, width=120)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("envoy-descriptor", "edge"),
            "binaryData": {"capibara.pb": base64.b64encode(descriptor.descriptor_set().SerializeToString()).decode()},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("envoy-web", "edge"), "data": web_files},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("envoy", "edge"),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": selector("envoy")},
                "template": {
                    "metadata": {"labels": meta("envoy", "edge")["labels"]},
                    "spec": {"containers": [container], "volumes": volumes},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("envoy", "edge"),
            "spec": {
                "type": "LoadBalancer",
                "selector": selector("envoy"),
                "ports": [{"name": "https", "port": 443, "targetPort": "edge"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("envoy-mesh", "edge"),
            "spec": {
                "selector": selector("envoy"),
                "ports": [{"name": "mesh", "port": pods.edge.mesh_port, "targetPort": "mesh", "appProtocol": "grpc"}],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta("envoy", "edge"),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector("envoy")}},
        },
    ]


def _point_static_files_at(bootstrap: dict) -> None:
    """The page and the OpenAPI document come from the envoy-web ConfigMap in the pod."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                routes = network_filter["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
                for route in routes:
                    body = route.get("direct_response", {}).get("body", {})
                    if "filename" in body:
                        body["filename"] = f"/etc/envoy/web/{pathlib.Path(body['filename']).name}"


def _network_policies(config: MeshConfig) -> list[dict]:
    def policy(name: str, pod: dict, sources: list[dict], ports: list[int]) -> dict:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(name, "policy"),
            "spec": {
                "podSelector": {"matchLabels": pod} if pod else {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": sources, "ports": [{"port": p} for p in ports]}] if sources or ports else [],
            },
        }

    envoy = {"podSelector": {"matchLabels": selector("envoy")}}
    policies = [policy("default-deny", {}, [], [])]
    policies.append(policy("edge-from-anywhere", selector("envoy"), [], [config.edge.port]))
    policies.append(
        policy(
            "envoy-mesh-from-services",
            selector("envoy"),
            [{"podSelector": {"matchLabels": {"capibara/component": "service"}}}],
            [config.edge.mesh_port],
        )
    )
    for service in config.deployed_services:
        endpoint = config.services.endpoint(service)
        ports = [endpoint.port, *(p["port"] for p in _mcp_ports(config, service, "port"))]
        policies.append(policy(f"{service}-from-envoy", selector(service), [envoy], ports))
    for model_id in config.models:
        # The context service counts tokens with the model's own tokenizer (/tokenize).
        callers = [{"podSelector": {"matchLabels": selector(s)}} for s in ("inference", "context")]
        policies.append(
            policy(f"model-{model_id}-from-inference", selector(f"model-{model_id}"), callers, [MODEL_PORT])
        )
    return policies + tracing_objects.network_policies(policy)


def manifests(config: MeshConfig) -> dict[str, list[dict]]:
    """File name -> documents."""
    pods = pod_config(config)
    files = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}],
        "config.yaml": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta("capibara-config", "config"),
                "data": {"capibara.yaml": _config_yaml(pods)},
            }
        ],
        "envoy.yaml": _envoy(config, pods),
        "network-policies.yaml": _network_policies(pods),
        "models.yaml": [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": meta("models", "model"),
                "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "20Gi"}}},
            }
        ]
        + [doc for m in config.models.values() for doc in model_deployment(m, gpu=m.launch is None)],
        f"{tracing_objects.COLLECTOR}.yaml": tracing_objects.collector(),
        f"{tracing_objects.JAEGER}.yaml": tracing_objects.jaeger(),
    }
    for service in config.deployed_services:
        files[f"{service}.yaml"] = _service_deployment(pods, service)
    files["kustomization.yaml"] = [
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": NAMESPACE,
            "resources": sorted(f for f in files),
        }
    ]
    return files


def render(config: MeshConfig) -> dict[str, str]:
    header = (
        f"# Generated by `capibara k8s` from {pathlib.Path(config.source).name}; do not edit (overlays patch it).\n"
    )
    return {
        name: header + tracing_objects.NOTES.get(name, "") + yaml.safe_dump_all(docs, sort_keys=False, width=120)
        for name, docs in manifests(config).items()
    }
