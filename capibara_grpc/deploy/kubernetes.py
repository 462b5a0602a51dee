"""Kubernetes manifests (a kustomize base) generated from the mesh configuration.

Why kustomize and not Helm: the manifests are generated from the same mesh config as the local
Envoy config, so a values layer would be a second source of truth; plain YAML in a kustomize base
is what `kubectl apply -k` reads, diffs well, and overlays (replicas, images, GPU nodes) patch it.

`capibara k8s` writes deploy/kubernetes/base; a test validates every manifest against the
Kubernetes schemas (kubernetes-validate) and checks the committed files match the config.
"""

from __future__ import annotations

import base64
import copy
import pathlib

import yaml

from capibara_grpc.config import MeshConfig, ModelConfig
from capibara_grpc.config.parsing import as_data
from capibara_grpc.edge import descriptor, envoy_config
from capibara_grpc.stubs import SERVICE_FULL_NAMES

NAMESPACE = "capibara"
IMAGE = "ghcr.io/capibara-mesh/capibara:latest"  # built from deploy/Dockerfile
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
LLAMA_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
VLLM_IMAGE = "vllm/vllm-openai:latest"
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


def _meta(name: str, component: str, **extra) -> dict:
    return {"name": name, "namespace": NAMESPACE, "labels": {"app.kubernetes.io/name": name,
                                                                 "app.kubernetes.io/part-of": "capibara",
                                                                 "capibara/component": component}, **extra}


def _selector(name: str) -> dict:
    return {"app.kubernetes.io/name": name}


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
    return pods


def _config_yaml(pods: MeshConfig) -> str:
    data = as_data(pods)
    for model in data["models"].values():
        model.pop("launch", None)
    return yaml.safe_dump(data, sort_keys=False)


def _service_deployment(config: MeshConfig, service: str) -> list[dict]:
    endpoint = config.services.endpoint(service)
    requests, limits = RESOURCES.get(service, DEFAULT_RESOURCES)
    probe = {"grpc": {"port": endpoint.port, "service": SERVICE_FULL_NAMES[service]}, "periodSeconds": 5}
    container = {
        "name": service,
        "image": IMAGE,
        "args": ["--config", CONFIG_PATH, "serve", service],
        "ports": [{"name": "grpc", "containerPort": endpoint.port}, {"name": "metrics", "containerPort": endpoint.metrics}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "initialDelaySeconds": 30, "failureThreshold": 6},
        "startupProbe": {**probe, "failureThreshold": 60},
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/capibara"}, {"name": "state", "mountPath": "/var/lib/capibara"}],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }
    replicas = 1 if service == "speech" else 2
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(service, "service"),
         "spec": {"replicas": replicas, "selector": {"matchLabels": _selector(service)},
                  "template": {"metadata": {"labels": _meta(service, "service")["labels"]},
                               "spec": {"containers": [container],
                                        "volumes": [{"name": "config", "configMap": {"name": "capibara-config"}},
                                                    {"name": "state", "emptyDir": {}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(service, "service"),
         "spec": {"selector": _selector(service),
                  "ports": [{"name": "grpc", "port": endpoint.port, "targetPort": "grpc", "appProtocol": "grpc"},
                            {"name": "metrics", "port": endpoint.metrics, "targetPort": "metrics"}]}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(service, "service"),
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": service},
                  "minReplicas": replicas, "maxReplicas": 10,
                  "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                                "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(service, "service"),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector(service)}}},
    ]


def _model_deployment(model: ModelConfig, gpu: bool) -> list[dict]:
    name = f"model-{model.model_id}"
    if gpu:
        container = {"name": "vllm", "image": VLLM_IMAGE,
                     "args": ["--model", model.backend.model_name or model.model_id, "--served-model-name",
                              model.backend.model_name or model.model_id, "--host", "0.0.0.0", "--port", str(MODEL_PORT)],
                     "resources": {"requests": {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": "1"},
                                   "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}}
    else:
        launch = model.launch
        container = {"name": "llama-server", "image": LLAMA_IMAGE,
                     "args": ["--model", f"/models/{pathlib.Path(launch.model_path).name if launch.model_path != 'smollm2' else 'SmolLM2-135M-Instruct.Q4_1.gguf'}",
                              "--alias", model.model_id, "--host", "0.0.0.0", "--port", str(MODEL_PORT),
                              "--parallel", str(launch.parallel), "--ctx-size", str(launch.ctx_size),
                              "--threads", str(max(1, launch.threads)), "--no-webui"],
                     "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
                     "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}
    probe = {"httpGet": {"path": "/health", "port": MODEL_PORT}, "periodSeconds": 5}
    container.update({"ports": [{"name": "http", "containerPort": MODEL_PORT}], "readinessProbe": probe,
                      "livenessProbe": {**probe, "initialDelaySeconds": 60, "failureThreshold": 6}})
    volumes = [] if gpu else [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, "model"),
         "spec": {"replicas": 1 + len(model.backend.replicas), "selector": {"matchLabels": _selector(name)},
                  "template": {"metadata": {"labels": _meta(name, "model")["labels"]},
                               "spec": {"containers": [container], "volumes": volumes}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, "model"),
         "spec": {"selector": _selector(name), "ports": [{"name": "http", "port": MODEL_PORT, "targetPort": "http"}]}},
    ]


def _envoy(config: MeshConfig, pods: MeshConfig) -> list[dict]:
    def dns(service: str) -> list[tuple[str, int]]:
        return [(f"{service}.{NAMESPACE}.svc.cluster.local", pods.services.endpoint(service).port)]

    bootstrap = envoy_config.build(pods, pathlib.Path("/etc/envoy/descriptor/capibara.pb"),
                                   pathlib.Path("/etc/envoy/tls/tls.crt"), pathlib.Path("/etc/envoy/tls/tls.key"),
                                   keys_file=KEYS_PATH, addresses=dns, bind_all=True)
    _point_static_files_at(bootstrap)
    ports = [("edge", pods.edge.port), ("mesh", pods.edge.mesh_port)]
    container = {
        "name": "envoy", "image": ENVOY_IMAGE, "args": ["-c", "/etc/envoy/envoy.yaml", "--log-level", "warn"],
        "ports": [{"name": name, "containerPort": port} for name, port in ports],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": pods.edge.admin_port}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/envoy"},
                         {"name": "descriptor", "mountPath": "/etc/envoy/descriptor"},
                         {"name": "web", "mountPath": "/etc/envoy/web"},
                         {"name": "tls", "mountPath": "/etc/envoy/tls", "readOnly": True},
                         {"name": "api-keys", "mountPath": "/etc/capibara/api-keys", "readOnly": True}],
    }
    volumes = [{"name": "config", "configMap": {"name": "envoy-config"}},
               {"name": "descriptor", "configMap": {"name": "envoy-descriptor"}},
               {"name": "web", "configMap": {"name": "envoy-web"}},
               {"name": "tls", "secret": {"secretName": "edge-tls"}},
               # API keys: `kubectl create secret generic capibara-api-keys --from-file=keys=./api-keys.txt`
               {"name": "api-keys", "secret": {"secretName": "capibara-api-keys", "optional": True}}]
    web_files = {path.name: path.read_text() for path in sorted(envoy_config.WEB.iterdir()) if path.is_file()}
    web_files["openapi.json"] = envoy_config.OPENAPI_DOCUMENT.read_text()
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("envoy-config", "edge"),
         "data": {"envoy.yaml": yaml.safe_dump(bootstrap, sort_keys=False, width=120)}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("envoy-descriptor", "edge"),
         "binaryData": {"capibara.pb": base64.b64encode(descriptor.descriptor_set().SerializeToString()).decode()}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("envoy-web", "edge"), "data": web_files},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("envoy", "edge"),
         "spec": {"replicas": 2, "selector": {"matchLabels": _selector("envoy")},
                  "template": {"metadata": {"labels": _meta("envoy", "edge")["labels"]},
                               "spec": {"containers": [container], "volumes": volumes}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("envoy", "edge"),
         "spec": {"type": "LoadBalancer", "selector": _selector("envoy"),
                  "ports": [{"name": "https", "port": 443, "targetPort": "edge"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("envoy-mesh", "edge"),
         "spec": {"selector": _selector("envoy"), "ports": [{"name": "mesh", "port": pods.edge.mesh_port,
                                                              "targetPort": "mesh", "appProtocol": "grpc"}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta("envoy", "edge"),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": _selector("envoy")}}},
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
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, "policy"),
                "spec": {"podSelector": {"matchLabels": pod} if pod else {}, "policyTypes": ["Ingress"],
                         "ingress": [{"from": sources, "ports": [{"port": p} for p in ports]}] if sources or ports else []}}

    envoy = {"podSelector": {"matchLabels": _selector("envoy")}}
    policies = [policy("default-deny", {}, [], [])]
    policies.append(policy("edge-from-anywhere", _selector("envoy"), [], [config.edge.port]))
    policies.append(policy("envoy-mesh-from-services", _selector("envoy"),
                           [{"podSelector": {"matchLabels": {"capibara/component": "service"}}}], [config.edge.mesh_port]))
    for service in config.deployed_services:
        endpoint = config.services.endpoint(service)
        policies.append(policy(f"{service}-from-envoy", _selector(service), [envoy], [endpoint.port]))
    for model_id in config.models:
        # The context service counts tokens with the model's own tokenizer (/tokenize).
        callers = [{"podSelector": {"matchLabels": _selector(s)}} for s in ("inference", "context")]
        policies.append(policy(f"model-{model_id}-from-inference", _selector(f"model-{model_id}"), callers, [MODEL_PORT]))
    return policies


def manifests(config: MeshConfig) -> dict[str, list[dict]]:
    """File name -> documents."""
    pods = pod_config(config)
    files = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}],
        "config.yaml": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("capibara-config", "config"),
                         "data": {"capibara.yaml": _config_yaml(pods)}}],
        "envoy.yaml": _envoy(config, pods),
        "network-policies.yaml": _network_policies(pods),
        "models.yaml": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta("models", "model"),
                         "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "20Gi"}}}}]
        + [doc for m in config.models.values() for doc in _model_deployment(m, gpu=m.launch is None)],
    }
    for service in config.deployed_services:
        files[f"{service}.yaml"] = _service_deployment(pods, service)
    files["kustomization.yaml"] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "namespace": NAMESPACE, "resources": sorted(f for f in files)}]
    return files


def render(config: MeshConfig) -> dict[str, str]:
    header = f"# Generated by `capibara k8s` from {pathlib.Path(config.source).name}; do not edit (overlays patch it).\n"
    return {name: header + yaml.safe_dump_all(docs, sort_keys=False, width=120) for name, docs in manifests(config).items()}
