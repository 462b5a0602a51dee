"""The `capibara` command as a user runs it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

BIN = pathlib.Path(sys.executable).parent


def capibara(mesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "capibara"), "--config", str(mesh.config_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_chat_streams_an_answer_in_the_terminal(mesh):
    result = capibara(
        mesh, "chat", "¿Qué es un capibara?", "--model", "phi", "--max-tokens", "10", "--temperature", "0"
    )
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
    validated = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(envoy_yaml)], capture_output=True, text=True, timeout=60
    )
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
        ("POST", "/api/chat"),
        ("POST", "/api/chat/stream"),
        ("POST", "/api/router/test"),
        ("GET", "/api/router/routes"),
        ("GET", "/api/models"),
        ("POST", "/api/context/enrich"),
        ("POST", "/api/toon/encode"),
        ("POST", "/api/toon/decode"),
        ("POST", "/api/consensus"),
        ("POST", "/api/consensus/stream"),
        ("POST", "/api/tts/speak"),
        ("GET", "/api/tts/voices"),
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
    process = subprocess.Popen(
        [str(BIN / "capibara"), "--config", str(path), "serve", "inference"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for _ in range(50):
            line = process.stdout.readline()
            if "serving inference" in line or not line:
                break
        assert "serving inference" in line
        out = subprocess.run(
            [
                str(BIN / "grpcurl"),
                "-plaintext",
                "127.0.0.1:27053",
                "capibara.inference.v1.InferenceService/ListModels",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert '"healthy": true' in out.stdout and "gpt-oss-20b" in out.stdout
    finally:
        process.terminate()
        process.wait(10)


def _context_only_config(tmp_path) -> pathlib.Path:
    """A config on free ports whose context service starts without any model server."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    path = tmp_path / "capibara.yaml"
    path.write_text(f"""
state_dir: {tmp_path / "state"}
services: {{context: {{port: {ports[0]}, metrics_port: {ports[1]}}}}}
router: {{enabled: false}}
gateway: {{default_model: m}}
models: {{m: {{backend: {{url: "http://127.0.0.1:9"}}}}}}
""")
    return path


def _read_until(read, marker: str, timeout_s: float = 60) -> str:
    import time

    output, deadline = "", time.monotonic() + timeout_s
    while marker not in output and time.monotonic() < deadline:
        chunk = read()
        if not chunk:
            break
        output += chunk
    return output


def test_a_terminal_shows_readable_log_lines(tmp_path):
    """`make run` in a terminal: one text line per event (time, level, logger, message)."""
    import os
    import pty
    import re
    import select

    env = {k: v for k, v in os.environ.items() if k != "CAPIBARA_LOG_FORMAT"}
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [str(BIN / "capibara"), "serve", "context", "--config", str(_context_only_config(tmp_path))],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)

    def read() -> str:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            return os.read(leader, 4096).decode(errors="replace") if ready else ""
        except OSError:  # the process is gone
            return ""

    try:
        output = _read_until(read, "serving context")
    finally:
        process.terminate()
        process.wait(10)
        os.close(leader)
    assert "serving context" in output, output
    assert re.search(
        r"^\d\d:\d\d:\d\d\.\d{3} INFO +capibara_grpc\.server: context service on 127\.0\.0\.1:\d+\r?$",
        output,
        re.MULTILINE,
    ), output
    assert not any(line.startswith("{") for line in output.splitlines())


def test_a_pipe_gets_json_log_lines(tmp_path):
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != "CAPIBARA_LOG_FORMAT"}
    process = subprocess.Popen(
        [str(BIN / "capibara"), "--config", str(_context_only_config(tmp_path)), "serve", "context"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        output = _read_until(process.stdout.readline, "serving context")
    finally:
        process.terminate()
        process.wait(10)
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(
        e["logger"] == "capibara_grpc.server" and e["message"].startswith("context service on") for e in entries
    ), output
