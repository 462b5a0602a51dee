"""`capibara up`: start llama-servers, the services and Envoy; keep them running; stop all of them
on the way out.

Child processes (children.ChildProcess) run in their own process groups with output in
state_dir/logs, and are terminated (then killed) as a group, so nothing is left behind after
Ctrl-C. A child that dies is reported with its cause (process_exit.describe_exit), its log's path
and last lines, and started again under the `supervision` policy (supervisor.RestartTracker):
same argv, same log (appended).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time

import aiohttp

from capibara_grpc.config import REPO_ROOT, ConfigError, MeshConfig, url_host_port
from capibara_grpc.config.mcp_endpoint import http_port as mcp_http_port
from capibara_grpc.edge import envoy_config
from capibara_grpc.server import MeshServers
from capibara_grpc.supervision.children import (
    GIVEN_UP,
    LEFT_DEAD,
    RUNNING,
    WAITING,
    ChildProcess,
    LoadProgress,
    death_message,
    indented_tail,
    port_is_free,
)
from capibara_grpc.supervision.install_check import MissingBinary
from capibara_grpc.supervision.launch_commands import (
    StartupError,
    envoy_argv,
    envoy_env,
    llama_server_argv,
    service_argv,
    speech_in_own_process,
)
from capibara_grpc.supervision.priority import Spawner
from capibara_grpc.supervision.process_exit import describe_exit
from capibara_grpc.supervision.supervisor import GIVE_UP, RESTART, RestartTracker
from capibara_grpc.tracing import LOG_FORMAT_ENV

# Seconds a port may stay busy before the mesh says another program holds it (_check_ports).
PORT_WAIT_S = 3.0


class Mesh:
    """Everything `capibara up` runs, as one unit."""

    def __init__(self, config: MeshConfig, log=None, split: bool = False):
        self.config = config
        # split: every service in its own `capibara serve <svc>` process, as in a deployment.
        self.split = split
        emit = log or (lambda text: print(text, file=sys.stderr, flush=True))

        def say(text: str) -> None:
            if self.progress:  # not inside the progress line on a terminal
                self.progress.clear()
            emit(text)

        self.log = say
        # While the model servers load: how long each has been loading (children.LoadProgress).
        self.progress: LoadProgress | None = None
        self.children: list[ChildProcess] = []
        self.servers: MeshServers | None = None
        self.logs = config.state_path / "logs"
        self.watcher: asyncio.Task | None = None
        # Set when the mesh cannot serve any more (Envoy given up on or left dead): why.
        self.fatal: str | None = None
        self.failed = asyncio.Event()
        self.missing_models: list[str] = []
        self.up = False  # start() finished
        # Starts every child; the rest of this process runs supervision.mesh_nice levels nicer.
        self.spawner: Spawner | None = None

    def _check_ports(self) -> None:
        wanted = [
            (self.config.edge.listen_address, self.config.edge.port, "edge"),
            (self.config.edge.admin_address, self.config.edge.admin_port, "Envoy admin"),
        ]
        for service in self.config.deployed_services:
            endpoint = self.config.services.endpoint(service)
            wanted += [
                (self.config.services.host, endpoint.port, f"{service} service"),
                (self.config.services.host, endpoint.metrics, f"{service} metrics"),
            ]
        wanted += [
            (*url_host_port(url), f"llama-server for {m.model_id}")
            for m in self.config.models.values()
            if m.launch
            for url in m.server_urls
        ]
        if "gateway" in self.config.deployed_services:
            wanted.append((self.config.services.host, mcp_http_port(self.config), "gateway MCP over HTTP"))
        if self.config.services.via_envoy:
            wanted.append((self.config.edge.mesh_address, self.config.edge.mesh_port, "Envoy mesh listener"))
        if any(m.balanced_by_envoy for m in self.config.models.values()):
            wanted.append((self.config.edge.mesh_address, self.config.edge.models_port, "Envoy models listener"))
        busy = wanted
        # A port can be held for a moment by an outgoing connection that the kernel gave it
        # (ports from 32768 up are also the ephemeral range): only one still held after
        # PORT_WAIT_S is a mesh or another program listening there.
        deadline = time.monotonic() + PORT_WAIT_S
        while busy := [(h, p, w) for h, p, w in busy if not port_is_free(h, p)]:
            if time.monotonic() >= deadline:
                listing = ", ".join(f"{what} port {host}:{port}" for host, port, what in busy)
                raise StartupError("already in use (another mesh running?): " + listing)
            time.sleep(0.1)

    async def _launch(self, child: ChildProcess) -> ChildProcess:
        """Start a child under supervision."""
        child.tracker = RestartTracker(self.config.supervision)
        self.children.append(child)  # first: stop() finds it even if this is cancelled mid-start
        await self.spawner.run(child.start)
        if self.watcher is None:
            self.watcher = asyncio.create_task(self._watch())
        return child

    def _envoy_ports(self) -> list[tuple[str, int]]:
        edge = self.config.edge
        ports = [(edge.listen_address, edge.port), (edge.admin_address, edge.admin_port)]
        if self.config.services.via_envoy:
            ports.append((edge.mesh_address, edge.mesh_port))
        if any(m.balanced_by_envoy for m in self.config.models.values()):
            ports.append((edge.mesh_address, edge.models_port))
        return ports

    async def start(self) -> None:
        self._check_ports()
        # Model servers first (capibara_grpc/supervision/priority.py): children start from the spawner's
        # thread, at the priority capibara up was started with; the services in this process,
        # and Envoy and service processes (`nice`), run mesh_nice levels nicer.
        self.spawner = Spawner()
        # In a thread: a busy kernel makes the session group's write wait (up to a second).
        await asyncio.to_thread(self.spawner.lower_the_rest, self.config.supervision.mesh_nice)
        backends = []  # (child, url) of every llama-server started, replicas included
        for model in (m for m in self.config.models.values() if m.launch):
            for number, url in enumerate(model.server_urls):
                name = f"llama-server-{model.model_id}" + (f"-{number}" if number else "")
                child = await self._launch(
                    ChildProcess(
                        name,
                        llama_server_argv(self.config, model, url),
                        self.logs / f"{name}.log",
                        role=f"model {model.model_id}" + (f" (its server {url})" if model.backend.replicas else ""),
                        ports=[url_host_port(url)],
                    )
                )
                backends.append((child, url))
        own_process = {
            s: service_argv(self.config, s)
            for s in self.config.deployed_services
            if self.split or (s == "speech" and speech_in_own_process(self.config))
        }
        service_children = {}
        host = self.config.services.host
        for service, argv in own_process.items():
            endpoint = self.config.services.endpoint(service)
            service_children[service] = await self._launch(
                ChildProcess(
                    service,
                    argv,
                    self.logs / f"{service}.log",
                    env={"PYTHONPATH": str(REPO_ROOT), LOG_FORMAT_ENV: "json"},
                    role=f"the {service} service",
                    ports=[(host, endpoint.port), (host, endpoint.metrics)],
                    nice=self.config.supervision.mesh_nice,
                )
            )
        envoy_yaml = envoy_config.write(self.config)
        ready = await self._wait_models(backends)
        for (child, _), up in zip(backends, ready, strict=True):
            if not up:
                self.missing_models.append(child.name)
                self.log(f"capibara up: going on without {child.name}: {child.role} is unavailable")
        in_process = [s for s in self.config.deployed_services if s not in own_process]
        if in_process:
            self.servers = await MeshServers(self.config, in_process).start()
        await asyncio.gather(
            *(
                self._wait_grpc_serving(child, self.config.services.address(service))
                for service, child in service_children.items()
            )
        )
        envoy = await self._launch(
            ChildProcess(
                "envoy",
                envoy_argv(envoy_yaml),
                self.logs / "envoy.log",
                env=envoy_env(self.config),
                role="Envoy, the mesh's front door",
                ports=self._envoy_ports(),
                nice=self.config.supervision.mesh_nice,
            )
        )
        await self._wait_http(envoy, f"http://{self.config.edge.admin_address}:{self.config.edge.admin_port}/ready")
        self.up = True

    # -- supervision -------------------------------------------------------------------------

    async def _watch(self, interval_s: float = 0.2) -> None:
        """Notice every child that died and apply the restart policy to it."""
        while True:
            for child in list(self.children):
                if child.state == RUNNING and child.exited() is not None:
                    self._on_death(child)
            await asyncio.sleep(interval_s)

    def _on_death(self, child: ChildProcess) -> None:
        returncode = child.exited()
        uptime = time.monotonic() - child.started_at
        child.reap_group()
        child.last_exit = returncode
        decision = child.tracker.on_exit(returncode, uptime)
        policy = self.config.supervision
        if decision.action == RESTART:
            child.state = WAITING
            quick = (
                f"; {decision.quick_failures} of {policy.give_up_after} quick deaths in a row before giving up"
                if decision.quick_failures and policy.give_up_after
                else ""
            )
            self.log(
                "capibara up: "
                + death_message(
                    child,
                    returncode,
                    uptime,
                    f"restarting it in {decision.delay_s:g} s (restart {decision.attempt}{quick})",
                )
            )
            child.restart_task = asyncio.create_task(
                self._restart(child, decision.delay_s, decision.attempt, describe_exit(returncode))
            )
            return
        if decision.action == GIVE_UP:
            child.state = GIVEN_UP
            self.log(
                f"capibara up: giving up on {child.name} after {decision.quick_failures} attempts "
                f"({decision.reason}); last: {describe_exit(returncode)}; log: {child.log_path}; "
                f"{self._consequence(child)}\n" + indented_tail(child)
            )
        else:
            child.state = LEFT_DEAD
            consequence = f"; {self._consequence(child)}" if self.up else ""
            self.log(
                "capibara up: "
                + death_message(child, returncode, uptime, f"not restarted ({decision.reason}){consequence}")
            )
        if child.name == "envoy" and not self.fatal:
            self.fatal = f"envoy {describe_exit(returncode)}; nothing can reach the mesh (log: {child.log_path})"
            self.failed.set()

    def _consequence(self, child: ChildProcess) -> str:
        if child.name == "envoy":
            return "nothing can reach the mesh without it: stopping"
        if child.name.startswith("llama-server-"):
            return f"{child.role} stays down; the rest of the mesh keeps serving"
        if not self.up:
            return "the mesh cannot start without it: stopping"
        return f"{child.role} stays down; the rest of the mesh keeps running (GET /health says what is missing)"

    async def _restart(self, child: ChildProcess, delay_s: float, attempt: int, last_exit: str) -> None:
        await asyncio.sleep(delay_s)
        # The old process is dead, so its sockets are closed; wait until the kernel agrees, so the
        # new one binds instead of failing (and being counted as another death).
        deadline = time.monotonic() + 10.0
        busy = [p for p in child.ports if not port_is_free(*p)]
        while busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            busy = [p for p in child.ports if not port_is_free(*p)]
        if busy:
            self.log(f"capibara up: {child.name}: port {busy[0][0]}:{busy[0][1]} still in use; starting it anyway")
        try:
            await self.spawner.run(child.start, f"restart {attempt}, after the previous run {last_exit}")
        except OSError as exc:  # the binary went away, say
            child.state = GIVEN_UP
            self.log(
                f"capibara up: giving up on {child.name}: cannot start {child.argv[0]} ({exc}); "
                f"{self._consequence(child)}"
            )
            if child.name == "envoy":
                self.fatal = f"envoy cannot be started again ({exc})"
                self.failed.set()
            return
        self.log(f"capibara up: restarted {child.name} (pid {child.pid}, restart {attempt})")

    # -- readiness ---------------------------------------------------------------------------

    def _not_coming(self, child: ChildProcess) -> bool:
        """False while the child may still become ready; True if given up on; StartupError if it
        died and the policy leaves it dead (supervision.restart: no)."""
        if child.state == GIVEN_UP:
            return True
        if child.state == LEFT_DEAD:
            raise StartupError(
                f"{child.name} {describe_exit(child.last_exit)} while starting (see above) and is "
                f"not restarted (supervision.restart: {self.config.supervision.restart}); "
                f"log: {child.log_path}"
            )
        return False

    async def _wait_models(self, backends: list[tuple[ChildProcess, str]], timeout_s: float = 180.0) -> list[bool]:
        """Until every launched llama-server answers /health (or is given up on), showing how long
        each has been loading (LoadProgress: in place on a terminal, a line every few seconds
        elsewhere)."""
        if not backends:
            return []

        async def wait(child: ChildProcess, url: str) -> bool:
            # At the server's root, whatever path the URL has (an OpenAI base URL's /v1).
            up = await self._wait_http(child, "http://{}:{}/health".format(*url_host_port(url)), timeout_s)
            self.progress.ready(child.name.removeprefix("llama-server-"), up)
            return up

        self.progress = LoadProgress([child.name.removeprefix("llama-server-") for child, _ in backends])
        shown = asyncio.create_task(self.progress.run())
        try:
            return await asyncio.gather(*(wait(child, url) for child, url in backends))
        finally:
            shown.cancel()
            await asyncio.gather(shown, return_exceptions=True)
            self.progress.close()
            self.progress = None

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
                if self._not_coming(child):
                    raise StartupError(f"gave up on {child.name} while starting (see above); log: {child.log_path}")
                if child.state == RUNNING:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        return
                await asyncio.sleep(0.3)
        raise StartupError(f"{child.name} not answering at {address} after {timeout_s:.0f} s; log: {child.log_path}")

    async def _wait_http(self, child: ChildProcess, url: str, timeout_s: float = 60.0) -> bool:
        """True once `url` answers 200; False if the child was given up on (a model: the mesh goes
        on without it; Envoy: StartupError)."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self._not_coming(child):
                    if child.name == "envoy":
                        raise StartupError(f"gave up on envoy while starting (see above); log: {child.log_path}")
                    return False
                if child.state == RUNNING:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                            if response.status == 200:
                                return True
                await asyncio.sleep(0.2)
        raise StartupError(f"{child.name} not ready at {url} after {timeout_s:.0f} s; log: {child.log_path}")

    async def stop(self) -> None:
        # First nothing restarts any more, then everything stops, Envoy first.
        tasks = [t for t in [self.watcher, *(c.restart_task for c in self.children)] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.spawner:  # a child being started is started before it is stopped
            await asyncio.to_thread(self.spawner.close)
        for child in reversed(self.children):
            if child.name == "envoy":
                child.stop()
        if self.servers:
            await self.servers.stop(grace_s=1.0)
        for child in reversed(self.children):
            child.stop()

    def urls(self) -> list[str]:
        edge = self.config.edge
        host = "localhost" if edge.listen_address in ("0.0.0.0", "::", "127.0.0.1") else edge.listen_address
        return [
            f"web     https://{host}:{edge.port}/  (the chat page)",
            f"REST    https://{host}:{edge.port}/api/chat  (stream: /api/chat/stream; API: /api/openapi.json)",
            f"gRPC    {host}:{edge.port}  (TLS; grpcurl -insecure {host}:{edge.port} list)",
            f"health  https://{host}:{edge.port}/health",
            f"admin   http://{edge.admin_address}:{edge.admin_port}  (Envoy, loopback only; /stats/prometheus)",
            f"metrics http://{self.config.services.host}:{self.config.services.endpoint('gateway').metrics}/metrics  "
            f"(each service: its port + 1000)",
            f"logs    {self.logs}  (JSON lines: one file per process; capibara.log is this one's)",
        ]


async def run_until_signalled(config: MeshConfig, split: bool = False) -> int:
    mesh = Mesh(config, split=split)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"starting the mesh from {config.source} ...", flush=True)
        # Ctrl-C while starting (a model loading, a child in its restart delay) stops at once.
        starting = asyncio.create_task(mesh.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 0
        stopping.cancel()
        starting.result()  # StartupError
        missing = (
            f"\n  without: {', '.join(mesh.missing_models)} (given up on, see above)" if mesh.missing_models else ""
        )
        print("mesh is up:\n  " + "\n  ".join(mesh.urls()) + missing + "\nCtrl-C stops everything.", flush=True)
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(mesh.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        if mesh.fatal and not stop.is_set():
            print(f"capibara up: {mesh.fatal}", file=sys.stderr, flush=True)
            return 1
        return 0
    except (StartupError, MissingBinary) as exc:
        print(f"capibara up: {exc}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as exc:  # a file the configuration names, gone since it was loaded
        print(f"configuration error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        print("stopping the mesh ...", flush=True)
        await mesh.stop()
        print("stopped.", flush=True)
