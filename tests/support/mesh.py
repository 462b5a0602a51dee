"""Run a whole mesh as a child process (`capibara up --config ...`), for tests and benchmarks.

The mesh gets its own ports and state directory, so it never collides with `make run`.
A test harness, not part of the runtime package: nothing in capibara_grpc imports it.
"""

from __future__ import annotations

import contextlib
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

import yaml

from capibara_grpc.services import SERVICE_NAMES

REPO = pathlib.Path(__file__).resolve().parents[2]
# SmolLM2's chat template plus tools, as config/capibara.yaml launches the stand-in with.
TOOLS_TEMPLATE = REPO / "config" / "templates" / "chatml-tools.jinja"
VENV_BIN = pathlib.Path(sys.executable).parent
# In the service table's order: service i listens on base_port + 50 + i.
SERVICES = list(SERVICE_NAMES)


def mesh_config(state_dir: pathlib.Path, base_port: int, models: dict, router: bool = True) -> dict:
    """A mesh config dict: edge on base+1, admin on base+901, services on base+50.., loopback only.
    With `router`, the repository's routes file is used, so `models` must hold its model ids."""
    # Below Linux's ephemeral range (32768-60999): an outgoing connection (a database pool, say)
    # can hold any port there for minutes, and a mesh that needs it then fails to start.
    assert base_port + 1000 <= 32768, f"test mesh base port {base_port}: keep it below 31768"
    return {
        "router": {"enabled": router, "routes_file": str(REPO / "config" / "routes.yaml")},
        "state_dir": str(state_dir),
        # No per-client rate limit: every test call comes from 127.0.0.1 (test_edge_policies sets one).
        "edge": {
            "listen_address": "127.0.0.1",
            "port": base_port + 1,
            "admin_port": base_port + 901,
            "mesh_port": base_port + 2,
            "models_port": base_port + 3,
            "rate_limit": {"chat": 0, "other": 0},
        },
        "services": {
            name: {"port": base_port + 50 + i, "metrics_port": base_port + 70 + i} for i, name in enumerate(SERVICES)
        },
        "gateway": {"default_model": next(iter(models))},
        # Off, so that repeated test prompts reach the models; test_cache turns it on.
        "cache": {"enabled": False},
        "models": models,
    }


def launched_model(port: int, protocol: str = "llama_cpp", parallel: int = 2, threads: int = 1, **defaults) -> dict:
    """A model served by a llama-server that the mesh starts, on the shipped SmolLM2 GGUF.
    One thread each: several llama-servers with several threads on 2 cores thrash (see config)."""
    return {
        "backend": {"url": f"http://127.0.0.1:{port}", "protocol": protocol},
        "defaults": {"max_tokens": 40, "temperature": 0.7, **defaults},
        "launch": {
            "model_path": "smollm2",
            "parallel": parallel,
            "ctx_size": 2048 * parallel,
            "threads": threads,
            "chat_template_file": str(TOOLS_TEMPLATE),
        },
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

    def output(self) -> str:
        """What `capibara up` printed so far (up.log)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout_s: float = 30.0, count: int = 1) -> str:
        """up.log once it holds `text` (`count` times); AssertionError with the log if it does not in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            output = self.output()
            if output.count(text) >= count:
                return output
            if time.monotonic() > deadline:
                raise AssertionError(f"'{text}' not in up.log after {timeout_s:g} s:\n{output[-4000:]}")
            time.sleep(0.05)

    def backend_url(self, model_id: str) -> str:
        return self.config["models"][model_id]["backend"]["url"]

    def service_address(self, service: str) -> str:
        return f"127.0.0.1:{self.config['services'][service]['port']}"

    def service_pid(self, service: str) -> int:
        """The pid of this mesh's `capibara serve <service>` process (split mode)."""
        (line,) = [p for p in processes_using(f"serve {service}") if str(self.config_path) in p]
        return int(line.split(":", 1)[0])

    def llama_server_pids(self, model_id: str) -> list[int]:
        """The pids of the llama-servers serving `model_id` in this mesh (none while it is down)."""
        port = self.backend_url(model_id).rsplit(":", 1)[1]
        return [int(p.split(":", 1)[0]) for p in processes_using(f"--port {port} ") if "llama-server" in p]

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.config['services'][service]['metrics_port']}/metrics"

    def request(
        self,
        method: str,
        path: str,
        body=None,
        raw: bytes | None = None,
        timeout: float = 120,
        headers: dict[str, str] | None = None,
    ):
        """(status, parsed JSON, text or audio bytes, headers) of one REST call through Envoy."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"content-type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as response:
                status, payload, headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as exc:
            status, payload, headers = exc.code, exc.read(), exc.headers
        if headers.get("content-type", "").startswith("audio/"):
            return status, payload, headers
        text = payload.decode()
        try:
            return status, json.loads(text), headers
        except json.JSONDecodeError:
            return status, text, headers


def start_mesh(directory: pathlib.Path, config: dict, timeout_s: float = 240, split: bool = False) -> RunningMesh:
    config_path = directory / "capibara.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / "up.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "capibara"), "--config", str(config_path), "up", *(["--split"] if split else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    mesh = RunningMesh(config_path, config, process, log_path)
    deadline = time.monotonic() + timeout_s
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
    """'pid: command line' of running processes whose command line contains `marker`."""
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


@contextlib.contextmanager
def running_mesh(
    directory: pathlib.Path, base_port: int, models: dict, router: bool = True, split: bool = False, **sections
):
    """A mesh on ports base_port+..., state in directory/state; stopped (Ctrl-C) on exit.
    `sections` are more top-level config sections, e.g. supervision={"restart": "no"}."""
    mesh = start_mesh(
        directory, {**mesh_config(directory / "state", base_port, models, router), **sections}, split=split
    )
    try:
        yield mesh
    finally:
        stop_mesh(mesh)


def serve_replica(
    config_path: pathlib.Path,
    service: str,
    port: int | None = None,
    metrics_port: int | None = None,
    timeout_s: float = 120,
) -> subprocess.Popen:
    """Another replica of `service` (`capibara serve`, its own process), once it is serving. Its
    output goes to a log file beside the config: a pipe nobody reads would, once full, freeze it."""
    argv = [sys.executable, "-m", "capibara_grpc.cli", "--config", str(config_path), "serve", service]
    argv += ["--port", str(port)] if port else []
    argv += ["--metrics-port", str(metrics_port)] if metrics_port else []
    log_path = config_path.parent / f"replica-{service}-{port or 'default'}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if f"serving {service}" in log_path.read_text(errors="replace"):
            return process
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{service} replica exited with {process.wait()}:\n{log_path.read_text(errors='replace')}")
