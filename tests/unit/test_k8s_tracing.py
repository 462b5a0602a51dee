"""Traces in the Kubernetes manifests (capibara_grpc/deploy/tracing_objects.py): an OpenTelemetry
Collector and Jaeger with ClusterIP Services, the collector exporting to Jaeger's OTLP port, every
mesh container (each service and Envoy) pointed at the collector with the config's sampler and
its pod's attributes, and no secret of a trace backend anywhere in the text."""

from __future__ import annotations

import re

import pytest
import yaml

from capibara_grpc.config import load_config, parse_config
from capibara_grpc.deploy import kubernetes, tracing_objects
from capibara_grpc.telemetry import settings


@pytest.fixture(scope="module")
def config():
    config = load_config()
    config.tracing.sampler = "parentbased_traceidratio"
    config.tracing.sampler_arg = 0.25
    config.tracing.service_name_prefix = "acme"
    config.tracing.resource_attributes = {"deployment.environment": "prod, eu"}
    return config


@pytest.fixture(scope="module")
def documents(config):
    return kubernetes.manifests(config)


def by_kind(documents, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for docs in documents.values() for d in docs if d["kind"] == kind}


def mesh_containers(documents) -> dict[str, dict]:
    """Each service's and Envoy's container, by Deployment."""
    return {
        name: deployment["spec"]["template"]["spec"]["containers"][0]
        for name, deployment in by_kind(documents, "Deployment").items()
        if deployment["metadata"]["labels"]["capibara/component"] in ("service", "edge")
    }


def test_the_collector_and_jaeger_are_deployed_with_cluster_ip_services_and_pinned_images(documents):
    deployments, services = by_kind(documents, "Deployment"), by_kind(documents, "Service")
    for name, image in (
        ("otel-collector", "otel/opentelemetry-collector-contrib:"),
        ("jaeger", "jaegertracing/jaeger:"),
    ):
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith(image)
        assert re.fullmatch(r"\d+\.\d+\.\d+", container["image"].rpartition(":")[2]), container["image"]
        assert container["readinessProbe"] and container["resources"]["limits"]["memory"]
        assert services[name]["spec"]["type"] == "ClusterIP"
        assert services[name]["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in services["otel-collector"]["spec"]["ports"]} == {4317, 4318}
    assert {p["port"] for p in services["jaeger"]["spec"]["ports"]} == {4317, 16686}
    kustomization = documents["kustomization.yaml"][0]["resources"]
    assert {"otel-collector.yaml", "jaeger.yaml"} <= set(kustomization)


def test_the_collector_receives_otlp_and_exports_to_jaegers_otlp_port(documents):
    configmap = by_kind(documents, "ConfigMap")["otel-collector-config"]
    collector = yaml.safe_load(configmap["data"]["config.yaml"])
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and "batch" in pipeline["processors"]
    assert collector["exporters"]["debug"] == {"verbosity": "basic"}
    (exporter,) = [e for e in pipeline["exporters"] if e.startswith("otlp")]
    host, _, port = collector["exporters"][exporter]["endpoint"].partition(":")
    jaeger = by_kind(documents, "Service")[host]
    (otlp,) = [p for p in jaeger["spec"]["ports"] if p["port"] == int(port)]
    deployments = by_kind(documents, "Deployment")
    (container,) = deployments[host]["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[otlp["targetPort"]] == 4317
    # The collector mounts the ConfigMap where its --config reads it.
    (container,) = deployments["otel-collector"]["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--config=/etc/otelcol-contrib/config.yaml"]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/otelcol-contrib"


def test_every_mesh_container_exports_to_the_collector_with_the_configs_sampler(documents, config):
    containers = mesh_containers(documents)
    assert set(containers) == {*config.deployed_services, "envoy"}
    collector = by_kind(documents, "Service")["otel-collector"]
    for name, container in containers.items():
        env = {e["name"]: e for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{collector['metadata']['name']}:4317", name
        assert env["OTEL_SERVICE_NAME"]["value"] == "acme"
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.25"
        attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.pod.name=$(K8S_POD_NAME)" in attributes and "k8s.namespace.name=$(K8S_NAMESPACE_NAME)" in attributes
        assert f"k8s.deployment.name={name}" in attributes and "deployment.environment=prod%2C%20eu" in attributes
        assert env["K8S_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["K8S_NAMESPACE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        # $(NAME) expands only to a variable defined above it.
        names = [e["name"] for e in container["env"]]
        for variable in re.findall(r"\$\((\w+)\)", attributes):
            assert names.index(variable) < names.index("OTEL_RESOURCE_ATTRIBUTES")


def test_what_a_pod_resolves_is_the_collector_with_the_pods_attributes(documents):
    """The environment of a pod, expanded as the kubelet does, read by the mesh's own resolver,
    over the config file the pods mount."""
    container = mesh_containers(documents)["gateway"]
    pod = {
        "K8S_NAMESPACE_NAME": "capibara",
        "K8S_POD_NAME": "gateway-7d9f-x2",
        "K8S_POD_UID": "u1",
        "K8S_NODE_NAME": "n1",
    }
    environ = {
        e["name"]: re.sub(r"\$\((\w+)\)", lambda m: pod[m.group(1)], e.get("value", "")) for e in container["env"]
    }
    environ.update(pod)
    text = by_kind(documents, "ConfigMap")["capibara-config"]["data"]["capibara.yaml"]
    pods = parse_config(text, source="capibara-config", check_files=False)
    assert pods.tracing.endpoint == "http://otel-collector:4317" and pods.tracing.headers == {}
    resolved = settings.resolve(pods.tracing, environ)
    assert resolved.enabled and resolved.target == "otel-collector:4317" and not resolved.tls
    assert resolved.service_name("gateway") == "acme-gateway"
    assert resolved.sampler == "parentbased_traceidratio" and resolved.ratio == 0.25
    attributes = dict(resolved.resource_attributes)
    assert attributes["k8s.pod.name"] == "gateway-7d9f-x2" and attributes["k8s.namespace.name"] == "capibara"
    assert attributes["deployment.environment"] == "prod, eu"


def test_only_the_mesh_reaches_the_collector_and_only_the_collector_reaches_jaeger(documents):
    policies = by_kind(documents, "NetworkPolicy")
    (rule,) = policies["otel-collector-from-mesh"]["spec"]["ingress"]
    assert {s["podSelector"]["matchLabels"]["capibara/component"] for s in rule["from"]} == {"service", "edge"}
    assert {p["port"] for p in rule["ports"]} == {4317, 4318}
    (rule,) = policies["jaeger-from-otel-collector"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "otel-collector"}}}]
    assert [p["port"] for p in rule["ports"]] == [4317]


def test_a_trace_backends_key_is_never_in_the_manifests(monkeypatch):
    monkeypatch.setenv("TRACE_TOKEN", "sk-trace-9f8e7d6c5b4a")
    config = load_config()
    config.tracing.endpoint = "https://otlp.example.com:443"
    config.tracing.headers = {"authorization": "Bearer ${TRACE_TOKEN}", "x-team": "tk-literal-0a1b2c3d"}
    rendered = kubernetes.render(config)
    for secret in ("sk-trace-9f8e7d6c5b4a", "tk-literal-0a1b2c3d", "${TRACE_TOKEN}", "otlp.example.com"):
        assert not any(secret in text for text in rendered.values()), secret
    # A hosted backend's key reaches the collector from a Secret only.
    deployments = by_kind(kubernetes.manifests(config), "Deployment")
    (container,) = deployments["otel-collector"]["spec"]["template"]["spec"]["containers"]
    (key,) = container["env"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "trace-backend", "key": "api-key", "optional": True}


def test_the_collector_and_jaeger_manifests_say_how_to_open_them(config):
    rendered = kubernetes.render(config)
    jaeger, collector = rendered["jaeger.yaml"], rendered["otel-collector.yaml"]
    assert "kubectl -n capibara port-forward svc/jaeger 16686" in jaeger and "http://localhost:16686" in jaeger
    assert "create secret generic trace-backend" in collector
    for text in (jaeger, collector):
        assert all(doc["kind"] for doc in yaml.safe_load_all(text))  # the notes are comments
    assert tracing_objects.NOTES.keys() <= rendered.keys()


def test_the_manifests_do_not_depend_on_the_generating_shells_otel_variables(config, monkeypatch):
    before = kubernetes.render(config)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://elsewhere:4317")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shell")
    assert kubernetes.render(config) == before
