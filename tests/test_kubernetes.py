"""The Kubernetes manifests (deploy/kubernetes/base): generated from the mesh config and in sync
with it, valid against the Kubernetes schemas, and saying what a deployment needs (probes,
resources, autoscaling, disruption budgets, network policies, API keys from a Secret). Envoy's
ConfigMap passes `envoy --mode validate`."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from capibara_grpc.config import load_config, parse_config
from capibara_grpc.deploy import kubernetes
from capibara_grpc.edge.tls import ensure_certificate
from tests.support.mesh import REPO, VENV_BIN

BASE = REPO / "deploy" / "kubernetes" / "base"
SERVICES = ["gateway", "router", "context", "inference", "consensus", "speech"]


@pytest.fixture(scope="module")
def documents():
    return {name: docs for name, docs in kubernetes.manifests(load_config()).items()}


def by_kind(documents, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for docs in documents.values() for d in docs if d["kind"] == kind}


def test_committed_manifests_match_the_mesh_config():
    result = subprocess.run([str(VENV_BIN / "capibara"), "k8s", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    files = [str(p) for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml"]
    result = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.31.0", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_each_service_has_probes_resources_autoscaling_and_a_disruption_budget(documents):
    deployments, hpas, pdbs = (
        by_kind(documents, "Deployment"),
        by_kind(documents, "HorizontalPodAutoscaler"),
        by_kind(documents, "PodDisruptionBudget"),
    )
    for service in SERVICES:
        (container,) = deployments[service]["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["grpc"]["service"].startswith("capibara.")
        assert container["livenessProbe"]["grpc"]["port"] == container["ports"][0]["containerPort"]
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
        assert container["args"][-2:] == ["serve", service]
        assert service in hpas and service in pdbs
    assert deployments["model-gpt-oss-20b"]["spec"]["template"]["spec"]["containers"][0]["name"] == "llama-server"


def test_only_envoy_reaches_the_services_and_only_inference_and_context_the_models(documents):
    policies = by_kind(documents, "NetworkPolicy")
    assert policies["default-deny"]["spec"]["podSelector"] == {} and policies["default-deny"]["spec"]["ingress"] == []
    for service in SERVICES:
        (rule,) = policies[f"{service}-from-envoy"]["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "envoy"}}}]
    (rule,) = policies["model-phi-from-inference"]["spec"]["ingress"]
    assert {s["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for s in rule["from"]} == {"inference", "context"}


def test_api_keys_come_from_a_secret_and_no_secret_is_in_a_configmap(documents):
    envoy = by_kind(documents, "Deployment")["envoy"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in envoy["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "capibara-api-keys", "optional": True}
    envoy_yaml = by_kind(documents, "ConfigMap")["envoy-config"]["data"]["envoy.yaml"]
    assert kubernetes.KEYS_PATH in envoy_yaml


def test_pods_read_a_valid_mesh_config_that_uses_the_shared_stores(documents):
    text = by_kind(documents, "ConfigMap")["capibara-config"]["data"]["capibara.yaml"]
    config = parse_config(text, source="capibara-config", check_files=False)
    assert config.services.host == "0.0.0.0" and config.edge.mesh_address == "envoy-mesh"
    assert config.context.database.startswith("postgresql://") and config.cache.backend == "redis"
    assert config.models["phi"].backend.url == "http://model-phi:8080"


def test_envoy_configmap_passes_envoy_validation(documents, tmp_path):
    config = load_config()
    config.state_dir = str(tmp_path)
    cert, key = ensure_certificate(config)
    text = by_kind(documents, "ConfigMap")["envoy-config"]["data"]["envoy.yaml"]
    (tmp_path / "capibara.pb").write_bytes(
        __import__("base64").b64decode(by_kind(documents, "ConfigMap")["envoy-descriptor"]["binaryData"]["capibara.pb"])
    )
    web = tmp_path / "web"
    web.mkdir()
    for name, content in by_kind(documents, "ConfigMap")["envoy-web"]["data"].items():
        (web / name).write_text(content)
    text = (
        text.replace("/etc/envoy/descriptor/capibara.pb", str(tmp_path / "capibara.pb"))
        .replace("/etc/envoy/tls/tls.crt", str(cert))
        .replace("/etc/envoy/tls/tls.key", str(key))
        .replace("/etc/envoy/web/", f"{web}/")
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    result = subprocess.run(
        [str(VENV_BIN / "envoy"), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_model_keys_come_from_a_secret_never_the_manifests(monkeypatch):
    monkeypatch.setenv("HOSTED_KEY", "sk-k8s-0a1b2c3d4e5f")
    config = load_config()
    config.models["phi"].backend.url = "https://api.example.com/v1"
    config.models["phi"].backend.protocol = "openai"
    config.models["phi"].backend.api_key_env = "HOSTED_KEY"
    config.models["phi"].launch = None
    rendered = kubernetes.render(config)
    assert not any("sk-k8s-0a1b2c3d4e5f" in text for text in rendered.values())
    deployments = by_kind({n: d for n, d in kubernetes.manifests(config).items()}, "Deployment")
    for service in kubernetes.MODEL_CALLERS:
        (container,) = deployments[service]["spec"]["template"]["spec"]["containers"]
        # Beside the tracing variables every mesh container has (test_k8s_tracing), one secret.
        secrets = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert secrets == [
            {"name": "HOSTED_KEY", "valueFrom": {"secretKeyRef": {"name": "capibara-model-keys", "key": "HOSTED_KEY"}}}
        ]
    gateway_env = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in gateway_env)
