"""The `capibara` command as a user runs it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

BIN = pathlib.Path(sys.executable).parent


def capibara(mesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "capibara"), "--config", str(mesh.config_path), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_chat_streams_an_answer_in_the_terminal(mesh):
    result = capibara(mesh, "chat", "¿Qué es un capibara?", "--model", "phi", "--max-tokens", "10", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[phi" in result.stderr and "10 tokens" in result.stderr


def test_chat_reports_errors_with_their_status(mesh):
    result = capibara(mesh, "chat", "hola", "--model", "nope")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "nope" in result.stderr


def test_generated_envoy_config_passes_envoy_validation(mesh):
    result = capibara(mesh, "envoy-config")
    assert result.returncode == 0, result.stderr
    envoy_yaml = pathlib.Path(result.stdout.strip())
    validated = subprocess.run([str(BIN / "envoy"), "--mode", "validate", "-c", str(envoy_yaml)],
                               capture_output=True, text=True, timeout=60)
    assert validated.returncode == 0, validated.stderr


def test_only_the_edge_listens_outside_by_default(tmp_path):
    from capibara_grpc.config import load_config
    from capibara_grpc.edge import envoy_config

    config = load_config()
    built = envoy_config.build(config, tmp_path / "d.pb", tmp_path / "c.pem", tmp_path / "k.pem")
    listener, mesh_listener = built["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 5001}
    # The mesh listener, through which the services call each other, is loopback only.
    assert mesh_listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 5002}
    assert built["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for cluster in built["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert config.services.host == "127.0.0.1"
    assert all(m.host_port[0] == "127.0.0.1" for m in config.models.values())
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"]


def test_routes_lists_every_rest_path_of_the_contract(mesh):
    result = capibara(mesh, "envoy-config", "--routes")
    routes = {tuple(line.split()[:2]) for line in result.stdout.splitlines()}
    assert {
        ("POST", "/api/chat"), ("POST", "/api/chat/stream"), ("POST", "/api/router/test"),
        ("GET", "/api/router/routes"), ("GET", "/api/models"), ("POST", "/api/context/enrich"),
        ("POST", "/api/toon/encode"), ("POST", "/api/toon/decode"), ("POST", "/api/consensus"),
        ("POST", "/api/consensus/stream"), ("POST", "/api/tts/speak"), ("GET", "/api/tts/voices"),
        ("GET", "/health"),
    } <= routes


def test_serve_runs_a_single_service_as_its_own_process(mesh, tmp_path):
    import yaml

    config = yaml.safe_load(mesh.config_path.read_text())
    for i, name in enumerate(config["services"]):
        config["services"][name].update(port=27050 + i, metrics_port=27070 + i)
    config["edge"] = {"port": 27001, "admin_port": 27901, "mesh_port": 27002, "listen_address": "127.0.0.1"}
    path = tmp_path / "capibara.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([str(BIN / "capibara"), "--config", str(path), "serve", "inference"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(50):
            line = process.stdout.readline()
            if "serving inference" in line or not line:
                break
        assert "serving inference" in line
        out = subprocess.run([str(BIN / "grpcurl"), "-plaintext", "127.0.0.1:27053",
                              "capibara.inference.v1.InferenceService/ListModels"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert '"healthy": true' in out.stdout and "gpt-oss-20b" in out.stdout
    finally:
        process.terminate()
        process.wait(10)
