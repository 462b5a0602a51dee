"""Test fixtures: a real mesh (llama-servers, gRPC services, Envoy) started with `capibara up`.

The mesh under test uses its own ports and state directory, so it never collides with a mesh
started by `make run` on the same machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
VENV_BIN = pathlib.Path(sys.executable).parent


def mesh_config(state_dir: pathlib.Path, base_port: int, models: dict) -> dict:
    return {
        "state_dir": str(state_dir),
        "edge": {"listen_address": "127.0.0.1", "port": base_port + 1, "admin_port": base_port + 901},
        "services": {
            name: {"port": base_port + 50 + i}
            for i, name in enumerate(["gateway", "router", "context", "inference", "consensus", "speech"])
        },
        "gateway": {"default_model": next(iter(models))},
        "models": models,
    }


def launched_model(port: int, protocol: str = "llama_cpp", **defaults) -> dict:
    return {
        "backend": {"url": f"http://127.0.0.1:{port}", "protocol": protocol},
        "defaults": {"max_tokens": 40, "temperature": 0.7, **defaults},
        "launch": {"model_path": "smollm2", "parallel": 2, "ctx_size": 4096, "threads": 2},
    }


@dataclass
class RunningMesh:
    config_path: pathlib.Path
    config: dict
    process: subprocess.Popen
    log_path: pathlib.Path

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.config['edge']['port']}"

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.config['edge']['port']}"

    @property
    def cert(self) -> pathlib.Path:
        return pathlib.Path(self.config["state_dir"]) / "tls" / "edge.crt"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def backend_url(self, model_id: str) -> str:
        return self.config["models"][model_id]["backend"]["url"]

    def service_address(self, service: str) -> str:
        return f"127.0.0.1:{self.config['services'][service]['port']}"

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
        """(status, parsed JSON or text, headers) of one REST call through Envoy."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as response:
                status, payload, headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, payload, headers = exc.code, exc.read(), exc.headers
        text = payload.decode()
        try:
            return status, json.loads(text), headers
        except json.JSONDecodeError:
            return status, text, headers


def start_mesh(tmp: pathlib.Path, config: dict) -> RunningMesh:
    config_path = tmp / "capibara.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp / "up.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(VENV_BIN / "capibara"), "--config", str(config_path), "up"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )
    mesh = RunningMesh(config_path, config, process, log_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"capibara up exited with {process.returncode}:\n{log_path.read_text()}")
        if "mesh is up" in log_path.read_text(errors="replace"):
            return mesh
        time.sleep(0.3)
    stop_mesh(mesh)
    raise RuntimeError(f"mesh did not come up:\n{log_path.read_text()}")


def stop_mesh(mesh: RunningMesh) -> int:
    """Ctrl-C, as a user would; returns the exit status."""
    if mesh.process.poll() is None:
        mesh.process.send_signal(signal.SIGINT)
        try:
            mesh.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(mesh.process.pid, signal.SIGKILL)
            mesh.process.wait()
    return mesh.process.returncode


def processes_using(marker: str) -> list[str]:
    """Command lines of running processes that mention `marker` (e.g. the mesh's config path)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture(scope="session")
def mesh(tmp_path_factory) -> RunningMesh:
    """The main mesh: gpt-oss-20b and phi on llama.cpp's native API, mixtral over the OpenAI API."""
    tmp = tmp_path_factory.mktemp("mesh")
    config = mesh_config(
        tmp / "state",
        25000,
        {
            "gpt-oss-20b": launched_model(25080),
            "phi": launched_model(25081, max_tokens=20, temperature=0.5),
            "mixtral": launched_model(25082, protocol="openai"),
        },
    )
    running = start_mesh(tmp, config)
    yield running
    stop_mesh(running)
