"""Builds and runs the gRPC servers of the mesh; one or several services per process.

Each service listens on its own port (services.<name>.port) with grpc.health.v1, server
reflection and the error mapping (errors.py). Which services exist, in which order a process
starts them and how is the service table's (capibara_grpc/services.py): each row names a start
function, `async def start(servers: MeshServers)`, beside its service (e.g. router/wiring.py),
which builds the servicers and calls `servers.serve(...)`. This module imports none of them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import typing
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from capibara_grpc import metrics, services, telemetry, tracing
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import error_mapping_server
from capibara_grpc.local_calls import LocalChannel, LocalMethod
from capibara_grpc.telemetry import spans
from capibara_grpc.telemetry.channel import TracedChannel
from capibara_grpc.telemetry.settings import resolve as resolve_tracing

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
# Derived from the service table; kept under their old names for their users.
START_ORDER = services.start_order(services.SERVICE_NAMES)
REQUIRED_BY_GATEWAY = services.REQUIRED_BY_GATEWAY
# A service that restarts is found again within a couple of seconds, not after gRPC's default
# reconnect backoff (up to 2 minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def internal_channel(config: MeshConfig, service: str) -> grpc.aio.Channel:
    """A channel to another service: through Envoy's mesh listener (health-checked, retried,
    load-balanced over replicas) or, with services.via_envoy false, straight to its port."""
    target = (
        f"{config.edge.mesh_address}:{config.edge.mesh_port}"
        if config.services.via_envoy
        else config.services.address(service)
    )
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())


def internal_channels(servers: MeshServers) -> dict[str, grpc.aio.Channel]:
    """A channel to every deployed service, closed when `servers` stop."""
    return {name: servers.channel(name) for name in servers.config.deployed_services}


def health_channel(config: MeshConfig, service: str, address: str | None = None) -> grpc.aio.Channel:
    """Straight to the service (or one replica): grpc.health.v1 asks about one process, and every
    service's Health/Check has the same path, so Envoy could not route it to the right one."""
    return grpc.aio.insecure_channel(address or config.services.address(service), options=CHANNEL_OPTIONS)


def _listen(server: grpc.aio.Server, config: MeshConfig, service: str) -> None:
    address = config.services.address(service)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for the {service} service (port in use?)")


class MeshServers:
    """The services of this process, started together and stopped together."""

    def __init__(self, config: MeshConfig, names: list[str]):
        unknown = [s for s in names if s not in services.BY_NAME]
        if unknown:
            raise ValueError(f"unknown service(s) {', '.join(unknown)} (known: {', '.join(services.SERVICE_NAMES)})")
        self.config = config
        self.services = names
        self._stack = AsyncExitStack()
        self.servers: list[grpc.aio.Server] = []
        self._unstarted: dict[str, grpc.aio.Server] = {}
        # The methods of this process's services, by path, for the others here (local_calls.py).
        self.local_methods: dict[str, LocalMethod] = {}

    async def start(self) -> MeshServers:
        try:
            # Traced from the first call on (telemetry.settings: the file's `tracing:`, OTEL_* first).
            uninstall = await telemetry.install(resolve_tracing(self.config.tracing), self.services[0])
            if uninstall is not None:
                self.on_stop(uninstall)
            # Every port is bound before any service opens outbound connections: the default
            # ports (50050-50055) lie in Linux's ephemeral range, where an outgoing connection
            # could otherwise take one first.
            for service in self.services:
                server = error_mapping_server(SERVER_OPTIONS, self.local_methods)
                _listen(server, self.config, service)
                self._unstarted[service] = server
            # Dependencies first, so the gateway's first call finds inference and router listening.
            for service in services.start_order(self.services):
                await services.start_function(service)(self)
            # What startup made (modules, the router's model, the config) lives as long as the
            # process: out of the garbage collector's way, a full collection no longer walks it
            # (hundreds of ms with the router's torch loaded, every few thousand chats: measured
            # in benchmarks/tracing_cost.py's runs, where spans made them more frequent).
            gc.freeze()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self, grace_s: float = 2.0) -> None:
        servers = self.servers + list(self._unstarted.values())
        await asyncio.gather(*(server.stop(grace_s) for server in servers), return_exceptions=True)
        self.servers.clear()
        self._unstarted.clear()
        await self._stack.aclose()

    async def wait(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self.servers))

    # -- for the services' start functions ----------------------------------------------------

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to another service, closed when these services stop: in this process when
        it runs here (services.local_calls), else over gRPC (internal_channel)."""
        channel = internal_channel(self.config, service)
        if spans.TRACER is not None:  # a CLIENT span for each call over the network
            channel = TracedChannel(channel)
        if self.config.services.local_calls and service in self.services:
            # A call in this process is a function call, not a gRPC one: no CLIENT span; the
            # called service's SERVER span is the child of the caller's (telemetry/server_spans.py).
            channel = LocalChannel(self.local_methods, channel)
        self.on_stop(channel.close)
        return channel

    def on_stop(self, callback: typing.Callable[..., typing.Awaitable], *args) -> None:
        """Await callback(*args) when this process's services stop (the last registered first)."""
        self._stack.push_async_callback(callback, *args)

    async def serve(
        self,
        service: str,
        add_servicers: typing.Callable[[grpc.aio.Server], None],
        *,
        reflected: list[str] | None = None,
        health: HealthServicer | None = None,
        serving: list[str] | None = None,
    ) -> None:
        """Start one service's server: its servicers, grpc.health.v1, reflection, the port.

        `reflected`: the services reflection describes (default: this one). `serving`: health
        names marked SERVING at once, with "" (default: this service, unless it brings its own
        `health` and publishes it itself, as inference does)."""
        full_name = services.service(service).full_name
        reflected = [full_name] if reflected is None else reflected
        serving = ([] if health else [full_name]) if serving is None else serving
        health = health or HealthServicer()
        server = self._unstarted.pop(service)
        add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            reflected + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        self.servers.append(server)
        await server.start()
        runner = await metrics.serve_metrics(self.config.services.host, self.config.services.endpoint(service).metrics)
        self.on_stop(runner.cleanup)
        for name in [*serving, ""] if serving else []:
            await health.set(name, SERVING)
        log.info("%s service on %s", service, self.config.services.address(service))
