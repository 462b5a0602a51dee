"""Prometheus metrics: /metrics on every service's metrics port, and Envoy's /stats/prometheus."""

from __future__ import annotations

import pathlib
import re
import urllib.request

import pytest

from tests.support.mesh import SERVICES


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain")
        return response.read().decode()


def value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_serves_metrics(mesh, service):
    assert "capibara_grpc_requests_total" in scrape(mesh.metrics_url(service))


def test_calls_are_counted_by_method_and_code_with_latency(mesh):
    before = scrape(mesh.metrics_url("gateway"))
    assert mesh.request("POST", "/api/chat", {"message": "hola", "model": "phi", "max_tokens": 3})[0] == 200
    assert mesh.request("POST", "/api/chat", {"message": " "})[0] == 400
    after = scrape(mesh.metrics_url("gateway"))
    for code in ("OK", "INVALID_ARGUMENT"):
        labels = {"service": "capibara.gateway.v1.ChatService", "method": "Complete", "code": code}
        assert (
            value(after, "capibara_grpc_requests_total", **labels)
            == value(before, "capibara_grpc_requests_total", **labels) + 1
        )
        assert value(after, "capibara_grpc_request_seconds_count", **labels) >= 1


def test_generation_metrics_per_model(mesh):
    assert (
        mesh.request("POST", "/api/chat", {"message": "hola", "model": "phi", "max_tokens": 5, "temperature": 0})[0]
        == 200
    )
    text = scrape(mesh.metrics_url("inference"))
    assert value(text, "capibara_time_to_first_token_seconds_count", model="phi") >= 1
    assert value(text, "capibara_tokens_per_second_count", model="phi") >= 1
    assert value(text, "capibara_generated_tokens_total", model="phi") >= 1
    assert 'capibara_queue_depth{model="phi"} 0.0' in text
    assert 'capibara_active_generations{model="phi"} 0.0' in text


def test_routing_decisions_are_counted_by_route(mesh):
    before = value(
        scrape(mesh.metrics_url("gateway")), "capibara_routing_decisions_total", route="math", source="router"
    )
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "¿Cuánto es 17 por 23?", "max_tokens": 3})
    assert status == 200 and body["routing"]["route_name"] == "math", body
    after = value(
        scrape(mesh.metrics_url("gateway")), "capibara_routing_decisions_total", route="math", source="router"
    )
    assert after == before + 1


def test_envoy_exports_prometheus_stats(mesh):
    admin = mesh.config["edge"]["admin_port"]
    text = scrape(f"http://127.0.0.1:{admin}/stats/prometheus")
    assert value(text, "envoy_cluster_upstream_rq_total", envoy_cluster_name="gateway") >= 1


def test_a_request_id_travels_through_every_hop_into_json_logs(mesh):
    import json
    import time
    import uuid

    request_id = f"trace-{uuid.uuid4().hex}"
    status, body, headers = mesh.request(
        "POST",
        "/api/chat",
        {"message": "¿Qué hora es?", "conversation_id": request_id, "max_tokens": 3},
        headers={"x-request-id": request_id},
    )
    assert status == 200, body
    assert headers["x-request-id"] == request_id
    expected = {
        "/capibara.gateway.v1.ChatService/Complete",
        "/capibara.router.v1.RouterService/Route",
        "/capibara.context.v1.ContextService/Enrich",
        "/capibara.context.v1.ContextService/AppendTurn",
        "/capibara.inference.v1.InferenceService/Generate",
    }
    for _ in range(50):
        lines = [
            json.loads(line)
            for line in mesh.log_path.read_text().splitlines()
            if line.startswith("{") and request_id in line
        ]
        if expected <= {line.get("method") for line in lines}:
            break
        time.sleep(0.1)
    assert expected <= {line.get("method") for line in lines}, lines
    assert all(line["request_id"] == request_id and line["code"] == "OK" for line in lines if "method" in line)
    envoy_log = pathlib.Path(mesh.config["state_dir"]) / "logs" / "envoy.log"
    for _ in range(100):  # Envoy flushes its access log every few seconds
        access = [json.loads(line) for line in envoy_log.read_text().splitlines() if request_id in line]
        if access:
            break
        time.sleep(0.1)
    assert access and access[0]["path"] == "/api/chat" and access[0]["status"] == 200


def test_services_in_one_process_call_each_other_without_envoy_and_still_count_the_calls(mesh):
    """`capibara up` runs every service in one process: a chat's inner hops are local calls
    (services.local_calls), which Envoy's mesh listener never sees, and which each service still
    counts as its own calls, with the same method and code as over gRPC."""
    admin = mesh.config["edge"]["admin_port"]

    def envoy_calls(cluster: str) -> float:
        text = scrape(f"http://127.0.0.1:{admin}/stats/prometheus")
        return value(text, "envoy_cluster_upstream_rq_total", envoy_cluster_name=cluster)

    def generated(text: str) -> float:
        labels = {"service": "capibara.inference.v1.InferenceService", "method": "Generate", "code": "OK"}
        return value(text, "capibara_grpc_requests_total", **labels)

    envoy_before = {name: envoy_calls(name) for name in ("inference", "context")}
    counted_before = generated(scrape(mesh.metrics_url("inference")))
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "hola", "model": "phi", "max_tokens": 3})
    assert status == 200, body
    assert {name: envoy_calls(name) for name in ("inference", "context")} == envoy_before
    assert generated(scrape(mesh.metrics_url("inference"))) == counted_before + 1
