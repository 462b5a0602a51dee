"""Envoy's own OpenTelemetry tracer in the Envoy config the mesh renders (envoy_config.build): off,
the config is exactly what it was without tracing; on, every HTTP connection manager traces to the
collector's cluster, with the settings' service name, sampler and batching, and no exporter header
(a hosted backend's key) ever appears in it. One test has Envoy itself validate the rendered file."""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import subprocess
import sys
import uuid

import yaml

from capibara_grpc.config import parse_config
from capibara_grpc.edge import descriptor, envoy_config
from capibara_grpc.edge import tracing as envoy_tracing
from capibara_grpc.edge.clusters import COLLECTOR_CLUSTER
from capibara_grpc.edge.tls import ensure_certificate
from capibara_grpc.supervision.launch_commands import envoy_env

HCM = "envoy.filters.network.http_connection_manager"
ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317"}


def mesh_config(tracing: dict | None = None):
    """The edge, the mesh listener (services.via_envoy) and the models listener (a model whose
    replicas Envoy balances): every HTTP connection manager the renderer makes."""
    servers = ["http://127.0.0.1:7080", "http://127.0.0.1:7081"]
    backend = {"url": servers[0], "protocol": "llama_cpp", "replicas": servers[1:], "balance": "least_requests"}
    text = yaml.safe_dump(
        {
            "models": {"m": {"backend": backend}},
            "gateway": {"default_model": "m"},
            "router": {"enabled": False},
            "services": {"via_envoy": True},
            **({"tracing": tracing} if tracing else {}),
        }
    )
    return parse_config(text, source="unit.yaml", check_files=set())


def render(environ: dict, tracing: dict | None = None, config=None) -> dict:
    config = config or mesh_config(tracing)
    paths = (pathlib.Path("/x/capibara.pb"), pathlib.Path("/x/edge.crt"), pathlib.Path("/x/edge.key"))
    return envoy_config.build(config, *paths, environ=environ)


def managers(bootstrap: dict) -> dict[str, dict]:
    """Each listener's HTTP connection manager, by listener name."""
    return {
        listener["name"]: f["typed_config"]
        for listener in bootstrap["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == HCM
    }


def clusters(bootstrap: dict) -> dict[str, dict]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def tracer(hcm: dict) -> dict:
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    return provider["typed_config"]


def test_off_the_config_is_what_it_is_without_tracing():
    off = render({})
    assert sorted(managers(off)) == ["edge", "mesh", "models"]
    assert all("tracing" not in hcm and "request_id_extension" not in hcm for hcm in managers(off).values())
    assert COLLECTOR_CLUSTER not in clusters(off) and "layered_runtime" not in off
    assert list(off) == ["admin", "static_resources"]
    # Off however it is off: no endpoint anywhere, or the SDK disabled over an endpoint.
    assert render({"OTEL_SDK_DISABLED": "true", **ENDPOINT}) == off
    assert render({"OTEL_SDK_DISABLED": "true"}, tracing={"endpoint": "http://collector.example:4317"}) == off


def test_on_every_listener_traces_to_the_collector():
    bootstrap = render(ENDPOINT)
    assert sorted(managers(bootstrap)) == ["edge", "mesh", "models"]
    for hcm in managers(bootstrap).values():
        config = tracer(hcm)
        assert config["service_name"] == "capibara-envoy"
        assert config["grpc_service"]["envoy_grpc"] == {
            "cluster_name": COLLECTOR_CLUSTER,
            "authority": "collector.example",
        }
        assert config["grpc_service"]["timeout"] == "30s"  # OTEL_BSP_EXPORT_TIMEOUT's default
        assert config["max_cache_size"] == 2048  # OTEL_BSP_MAX_QUEUE_SIZE's
        # Envoy's own x-request-id based decision is not used: the sampler decides alone.
        assert hcm["tracing"]["spawn_upstream_span"] is False  # one span a hop: the service's times the call
        assert hcm["tracing"]["random_sampling"] == {"value": 100}
        assert hcm["request_id_extension"]["typed_config"]["use_request_id_for_trace_sampling"] is False
    collector = clusters(bootstrap)[COLLECTOR_CLUSTER]
    (endpoint,) = collector["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "collector.example", "port_value": 4317}
    assert collector["type"] == "STRICT_DNS" and "transport_socket" not in collector
    options = collector["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # OTLP over gRPC
    # The span batches: every OTEL_BSP_SCHEDULE_DELAY, or as soon as OTEL_BSP_MAX_EXPORT_BATCH_SIZE wait.
    assert bootstrap["layered_runtime"]["layers"] == [
        {
            "name": "static",
            "static_layer": {
                "tracing.opentelemetry.flush_interval_ms": 5000,
                "tracing.opentelemetry.min_flush_spans": 512,
            },
        }
    ]
    # Everything else is as it is with tracing off.
    off = render({})
    for name, hcm in managers(bootstrap).items():
        assert {k: v for k, v in hcm.items() if k not in ("tracing", "request_id_extension")} == managers(off)[name]
    assert [c for c in bootstrap["static_resources"]["clusters"] if c["name"] != COLLECTOR_CLUSTER] == off[
        "static_resources"
    ]["clusters"]


def ratio_of(sampler: dict) -> float:
    assert sampler["name"] == "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based"
    percentage = sampler["typed_config"]["sampling_percentage"]
    assert percentage["denominator"] == "MILLION"
    return percentage["numerator"] / 1_000_000


def parent_based(sampler: dict) -> dict | None:
    """The sampler a parent-based sampler falls back on without a parent, or None."""
    if sampler["name"] != "envoy.tracers.opentelemetry.samplers.parent_based":
        return None
    return sampler["typed_config"]["wrapped_sampler"]


def test_the_edge_samples_as_the_settings_say_and_the_mesh_listeners_follow_their_caller():
    # parentbased_*: a caller's sampled flag is honoured; without one, the ratio decides.
    for environ, ratio in [
        ({}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0),
    ]:
        for name, hcm in managers(render({**ENDPOINT, **environ})).items():
            assert ratio_of(parent_based(tracer(hcm)["sampler"])) == ratio, (environ, name)
    # The others ignore the caller's flag at the edge; inside, the caller is a service that sampled
    # with the same setting, so it is followed.
    for environ, ratio in [
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.001"}, 0.001),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
    ]:
        edge, mesh, models = (tracer(hcm)["sampler"] for hcm in managers(render({**ENDPOINT, **environ})).values())
        assert parent_based(edge) is None and ratio_of(edge) == ratio, environ
        assert ratio_of(parent_based(mesh)) == ratio_of(parent_based(models)) == ratio, environ


def test_the_environment_wins_over_the_file():
    tracing = {
        "endpoint": "http://file.example:4317",
        "service_name_prefix": "file",
        "resource_attributes": {"deployment.environment": "file", "team": "mesh"},
        "schedule_delay_ms": 1000,
        "max_export_batch_size": 64,
    }
    environ = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env.example:14317",
        "OTEL_SERVICE_NAME": "acme",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    from_file, from_env = render({}, tracing), render(environ, tracing)
    address = clusters(from_env)[COLLECTOR_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"] == {"address": "env.example", "port_value": 14317}
    assert tracer(managers(from_file)["edge"])["service_name"] == "file-envoy"
    config = tracer(managers(from_env)["edge"])
    assert config["service_name"] == "acme-envoy"
    # As resolved here; then OTEL_RESOURCE_ATTRIBUTES as Envoy's process has it (a pod's), which wins.
    static, environment = config["resource_detectors"]
    assert environment["name"] == "envoy.tracers.opentelemetry.resource_detectors.environment"
    attributes = static["typed_config"]["attributes"]
    assert attributes["deployment.environment"] == "staging" and attributes["team"] == "mesh"
    assert attributes["service.namespace"] == "acme" and attributes["service.version"]
    assert from_env["layered_runtime"]["layers"][0]["static_layer"] == {
        "tracing.opentelemetry.flush_interval_ms": 200,
        "tracing.opentelemetry.min_flush_spans": 64,
    }


def test_an_https_endpoint_is_reached_over_tls_checked_against_the_collectors_name():
    collector = clusters(render({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example.com"}))[COLLECTOR_CLUSTER]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "otel.example.com", "port_value": 443}
    context = collector["transport_socket"]["typed_config"]
    assert context["@type"].endswith("UpstreamTlsContext") and context["sni"] == "otel.example.com"
    validation = context["common_tls_context"]["validation_context"]
    assert pathlib.Path(validation["trusted_ca"]["filename"]).is_absolute()
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "otel.example.com"}}
    ]
    # An address is checked as an address, and named in no SNI.
    collector = clusters(render({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://[::1]:4317"}))[COLLECTOR_CLUSTER]
    context = collector["transport_socket"]["typed_config"]
    assert collector["type"] == "STATIC" and "sni" not in context
    assert context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0]["san_type"] == (
        "IP_ADDRESS"
    )
    # OTEL_EXPORTER_OTLP_INSECURE=true: plaintext even to https://.
    insecure = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example.com:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    assert "transport_socket" not in clusters(render(insecure))[COLLECTOR_CLUSTER]


def test_no_exporter_header_reaches_envoys_config(caplog, monkeypatch):
    """Headers are often a hosted backend's key: never written into Envoy's files. Envoy then does
    not trace (a backend that needs them would refuse its spans, leaving holes in every trace), and
    says so once, naming the headers but no value."""
    envoy_tracing._warn_headers.cache_clear()  # "once" per process: this test's renders count
    monkeypatch.setenv("TRACE_KEY", "s3cr3t-file")  # the file's ${TRACE_KEY} is checked as it loads
    off = render({})
    from_env = {**ENDPOINT, "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=s3cr3t-env,other=v%20two"}
    from_file = {"endpoint": "https://api.example.com", "headers": {"authorization": "Bearer ${TRACE_KEY}"}}
    with caplog.at_level(logging.WARNING, logger=envoy_tracing.__name__):
        for bootstrap in (
            render(from_env),
            render(from_env),
            render({"TRACE_KEY": "s3cr3t-file"}, from_file),
        ):
            assert bootstrap == off
            text = yaml.safe_dump(bootstrap)
            assert "s3cr3t" not in text and "v two" not in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # once for each set of headers
    assert "other, x-honeycomb-team" in warnings[0] and "authorization" in warnings[1]
    assert not any("s3cr3t" in w or "Bearer" in w for w in warnings)


def test_capibara_up_gives_envoy_its_resource_attributes():
    """With tracing on, Envoy's environment has OTEL_RESOURCE_ATTRIBUTES (read by its tracer's
    `environment` detector, which warns while it is unset): an instance id and the host, added to
    the value already set without overriding it. With tracing off Envoy's environment is untouched."""
    config = mesh_config()
    assert envoy_env(config, {}) is None
    assert envoy_env(config, {"OTEL_SDK_DISABLED": "true", **ENDPOINT}) is None
    attributes = dict(pair.split("=") for pair in envoy_env(config, ENDPOINT)["OTEL_RESOURCE_ATTRIBUTES"].split(","))
    assert sorted(attributes) == ["host.name", "service.instance.id"]
    assert attributes["host.name"] == socket.gethostname() and uuid.UUID(attributes["service.instance.id"])
    own = {**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=staging,host.name=pod-7"}
    value = envoy_env(config, own)["OTEL_RESOURCE_ATTRIBUTES"]
    assert value.startswith("deployment.environment=staging,host.name=pod-7,service.instance.id=")
    assert value.count(",") == 2


def test_envoy_accepts_the_rendered_config(tmp_path):
    """Envoy 1.40 itself checks the rendered file (`--mode validate`: nothing listens), plaintext
    and TLS to the collector, a name and an address; in the environment capibara up gives it, its
    tracer's resource detectors find what they look for (no warning)."""
    config = mesh_config()
    config.state_dir = str(tmp_path / "state")
    cert, key = ensure_certificate(config)
    descriptor_path = tmp_path / "capibara.pb"
    descriptor_path.write_bytes(descriptor.descriptor_set().SerializeToString())
    envoy = pathlib.Path(sys.executable).parent / "envoy"
    for i, endpoint in enumerate(["http://127.0.0.1:4317", "https://otel.example.com", "https://[::1]:4317"]):
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
        bootstrap = envoy_config.build(config, descriptor_path, cert, key, environ=environ)
        assert "tracing" in managers(bootstrap)["edge"]
        rendered = tmp_path / f"envoy-{i}.yaml"
        rendered.write_text(yaml.safe_dump(bootstrap, sort_keys=False, width=120))
        env = {k: v for k, v in os.environ.items() if k != "OTEL_RESOURCE_ATTRIBUTES"} | envoy_env(config, environ)
        result = subprocess.run(
            [str(envoy), "--mode", "validate", "-c", str(rendered)], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, (endpoint, result.stderr[-3000:])
        assert "Failed to detect resource attributes" not in result.stdout + result.stderr
