"""Builds and runs the gRPC servers of the mesh; one or several services per process.

Each service listens on its own port (services.<name>.port) with grpc.health.v1, server
reflection and the error-mapping interceptor. The gateway's reflection describes every service of
the mesh, so `grpcurl localhost:5001 list` through Envoy shows them all.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from capibara_grpc.config import IMPLEMENTED_SERVICES, MeshConfig
from capibara_grpc.errors import ErrorMappingInterceptor
from capibara_grpc.gateway.core import ChatGateway
from capibara_grpc.gateway.health import MeshHealth
from capibara_grpc.gateway.servicer import ChatServicer, MeshServicer
from capibara_grpc.inference.client import InferenceClient
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.inference.servicer import SERVICE as INFERENCE_SERVICE
from capibara_grpc.inference.servicer import InferenceServicer, publish_health
from capibara_grpc.context.client import ContextClient
from capibara_grpc.router.client import RouterClient
from capibara_grpc.stubs import (
    MESH_SERVICE,
    SERVICE_FULL_NAMES,
    context_pb2_grpc,
    gateway_pb2_grpc,
    inference_pb2_grpc,
    router_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
START_ORDER = ["inference", "router", "context", "consensus", "speech", "gateway"]
# A service that restarts is found again within a couple of seconds, not after gRPC's default
# reconnect backoff (up to 2 minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def internal_channel(config: MeshConfig, service: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(config.services.address(service), options=CHANNEL_OPTIONS)


def _new_server() -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=SERVER_OPTIONS)


def _listen(server: grpc.aio.Server, config: MeshConfig, service: str) -> None:
    address = config.services.address(service)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for the {service} service (port in use?)")


class MeshServers:
    """The services of this process, started together and stopped together."""

    def __init__(self, config: MeshConfig, services: list[str]):
        unknown = [s for s in services if s not in IMPLEMENTED_SERVICES]
        if unknown:
            raise ValueError(
                f"service(s) {', '.join(unknown)} not implemented yet (available: {', '.join(IMPLEMENTED_SERVICES)})"
            )
        self.config = config
        self.services = services
        self._stack = AsyncExitStack()
        self.servers: list[grpc.aio.Server] = []

    async def start(self) -> "MeshServers":
        try:
            # Dependencies first, so the gateway's first call finds inference and router listening.
            for service in sorted(self.services, key=START_ORDER.index):
                await getattr(self, f"_start_{service}")()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self, grace_s: float = 2.0) -> None:
        await asyncio.gather(*(server.stop(grace_s) for server in self.servers), return_exceptions=True)
        self.servers.clear()
        await self._stack.aclose()

    async def wait(self) -> None:
        await asyncio.gather(*(server.wait_for_termination() for server in self.servers))

    def _register(self, server: grpc.aio.Server, health: HealthServicer, reflected: list[str]) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(reflected + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        self.servers.append(server)

    async def _start_inference(self) -> None:
        engine = InferenceEngine(self.config)
        health = HealthServicer()
        publish_health(engine, health)
        await engine.start()
        self._stack.push_async_callback(engine.stop)
        server = _new_server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine), server)
        self._register(server, health, [INFERENCE_SERVICE])
        _listen(server, self.config, "inference")
        await server.start()
        log.info("inference service on %s", self.config.services.address("inference"))

    async def _start_router(self) -> None:
        # Imported here: loading torch and sentence-transformers takes seconds and memory, which
        # processes without a router should not pay.
        from capibara_grpc.config import load_routes
        from capibara_grpc.router.core import Router
        from capibara_grpc.router.encoder import SentenceEncoder
        from capibara_grpc.router.servicer import ModelHealthWatcher, RouterServicer

        settings = self.config.router
        encoder = await asyncio.to_thread(SentenceEncoder, settings.encoder, settings.cache_size)
        inference = internal_channel(self.config, "inference")
        self._stack.push_async_callback(inference.close)
        watcher = ModelHealthWatcher(inference, sorted(self.config.models), settings.health_interval_s)
        watcher.start()
        self._stack.push_async_callback(watcher.stop)
        router = Router(self.config, load_routes(self.config), encoder.encode, watcher.is_healthy)
        self._stack.push_async_callback(router.close)
        await asyncio.to_thread(router.fit)
        health = HealthServicer()
        server = _new_server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
        self._register(server, health, [SERVICE_FULL_NAMES["router"]])
        _listen(server, self.config, "router")
        await server.start()
        await health.set(SERVICE_FULL_NAMES["router"], SERVING)
        await health.set("", SERVING)
        log.info("router service on %s", self.config.services.address("router"))

    async def _start_context(self) -> None:
        import aiohttp

        from capibara_grpc.context.core import ContextEngine
        from capibara_grpc.context.memory import ConversationStore
        from capibara_grpc.context.servicer import ContextServicer
        from capibara_grpc.context.tokens import ModelTokens

        store = ConversationStore(self.config.state_path / self.config.context.database)
        self._stack.callback(store.close)
        session = aiohttp.ClientSession()
        self._stack.push_async_callback(session.close)
        engine = ContextEngine(self.config, store, ModelTokens(self.config, session))
        health = HealthServicer()
        server = _new_server()
        context_pb2_grpc.add_ContextServiceServicer_to_server(ContextServicer(engine), server)
        self._register(server, health, [SERVICE_FULL_NAMES["context"]])
        _listen(server, self.config, "context")
        await server.start()
        await health.set(SERVICE_FULL_NAMES["context"], SERVING)
        await health.set("", SERVING)
        log.info("context service on %s", self.config.services.address("context"))

    async def _start_gateway(self) -> None:
        channels = {
            name: internal_channel(self.config, name)
            for name in self.config.deployed_services
        }
        for channel in channels.values():
            self._stack.push_async_callback(channel.close)
        router = RouterClient(channels["router"]).route if "router" in self.config.deployed_services else None
        context = ContextClient(channels["context"]) if "context" in self.config.deployed_services else None
        gateway = ChatGateway(self.config, InferenceClient(channels["inference"]).generate, router, context)
        mesh_health = MeshHealth(self.config, self.config.deployed_services, channels)
        health = HealthServicer()
        server = _new_server()
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(gateway), server)
        gateway_pb2_grpc.add_MeshServiceServicer_to_server(MeshServicer(mesh_health), server)
        # The front door describes the whole mesh, including services declared but not deployed.
        self._register(server, health, list(SERVICE_FULL_NAMES.values()) + [MESH_SERVICE])
        _listen(server, self.config, "gateway")
        await server.start()
        await health.set(SERVICE_FULL_NAMES["gateway"], SERVING)
        await health.set(MESH_SERVICE, SERVING)
        await health.set("", SERVING)
        log.info("gateway service on %s", self.config.services.address("gateway"))
