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

from capibara_grpc import metrics, tracing
from capibara_grpc.config import IMPLEMENTED_SERVICES, MeshConfig
from capibara_grpc.errors import ErrorMappingInterceptor
from capibara_grpc.gateway.core import ChatGateway
from capibara_grpc.gateway.health import MeshHealth
from capibara_grpc.gateway.servicer import ChatServicer, MeshServicer
from capibara_grpc.inference.client import InferenceClient
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.inference.servicer import SERVICE as INFERENCE_SERVICE
from capibara_grpc.inference.servicer import InferenceServicer, publish_health
from capibara_grpc.consensus.client import ConsensusClient
from capibara_grpc.context.client import ContextClient
from capibara_grpc.router.client import RouterClient
from capibara_grpc.speech.client import SpeechClient
from capibara_grpc.stubs import (
    MESH_SERVICE,
    SERVICE_FULL_NAMES,
    consensus_pb2_grpc,
    context_pb2_grpc,
    gateway_pb2_grpc,
    inference_pb2_grpc,
    router_pb2_grpc,
    speech_pb2_grpc,
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
    """A channel to another service: through Envoy's mesh listener (health-checked, retried,
    load-balanced over replicas) or, with services.via_envoy false, straight to its port."""
    target = (f"{config.edge.mesh_address}:{config.edge.mesh_port}" if config.services.via_envoy
              else config.services.address(service))
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())


def health_channel(config: MeshConfig, service: str, address: str | None = None) -> grpc.aio.Channel:
    """Straight to the service (or one replica): grpc.health.v1 asks about one process, and every
    service's Health/Check has the same path, so Envoy could not route it to the right one."""
    return grpc.aio.insecure_channel(address or config.services.address(service), options=CHANNEL_OPTIONS)


def _new_server() -> grpc.aio.Server:
    return grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=SERVER_OPTIONS)


def _listen(server: grpc.aio.Server, config: MeshConfig, service: str) -> None:
    address = config.services.address(service)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address} for the {service} service (port in use?)")


# Without these the gateway cannot answer a chat; router, consensus and speech only degrade it.
REQUIRED_BY_GATEWAY = ("inference", "context")


async def _watch_required(mesh_health: MeshHealth, health: HealthServicer, interval_s: float = 2.0) -> None:
    """The gateway is NOT_SERVING while a service it needs is down, so Envoy's health checks and
    orchestrators see it; it is SERVING again as soon as they are back."""
    names = ["", SERVICE_FULL_NAMES["gateway"]]
    while True:
        await asyncio.sleep(interval_s)
        try:
            serving = await mesh_health.services_serving(REQUIRED_BY_GATEWAY)
        except Exception:  # noqa: BLE001 - a health probe must never kill the service
            log.exception("dependency health check failed")
            continue
        for name in names:
            await health.set(name, SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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
        self._unstarted: dict[str, grpc.aio.Server] = {}

    async def start(self) -> "MeshServers":
        try:
            # Every port is bound before any service opens outbound connections: the default
            # ports (50050-50055) lie in Linux's ephemeral range, where an outgoing connection
            # could otherwise take one first.
            for service in self.services:
                server = _new_server()
                _listen(server, self.config, service)
                self._unstarted[service] = server
            # Dependencies first, so the gateway's first call finds inference and router listening.
            for service in sorted(self.services, key=START_ORDER.index):
                await getattr(self, f"_start_{service}")()
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

    async def _serve(self, service: str, add_servicers, reflected: list[str], health: HealthServicer | None = None,
                     serving: list[str] = ()) -> None:
        """Start one service's server: its servicers, grpc.health.v1, reflection, the port.
        `serving` names are marked SERVING at once (with ""); a service that publishes its own
        health (inference) passes its HealthServicer instead."""
        health = health or HealthServicer()
        server = self._unstarted.pop(service)
        add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            reflected + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        self.servers.append(server)
        await server.start()
        runner = await metrics.serve_metrics(self.config.services.host, getattr(self.config.services, service).metrics)
        self._stack.push_async_callback(runner.cleanup)
        for name in [*serving, ""] if serving else []:
            await health.set(name, SERVING)
        log.info("%s service on %s", service, self.config.services.address(service))

    async def _start_inference(self) -> None:
        engine = InferenceEngine(self.config)
        health = HealthServicer()
        publish_health(engine, health)
        await engine.start()
        self._stack.push_async_callback(engine.stop)
        servicer = InferenceServicer(engine)
        await self._serve("inference", lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
                          [INFERENCE_SERVICE], health=health)

    async def _start_router(self) -> None:
        # Imported here: loading torch and sentence-transformers takes seconds and memory, which
        # processes without a router should not pay.
        from capibara_grpc.config import load_routes
        from capibara_grpc.router.core import Router
        from capibara_grpc.router.encoder import shared_encoder
        from capibara_grpc.router.servicer import ModelHealthWatcher, RouterServicer

        settings = self.config.router
        encoder = await asyncio.to_thread(shared_encoder, settings.encoder, settings.cache_size)
        inference = health_channel(self.config, "inference")
        self._stack.push_async_callback(inference.close)
        watcher = ModelHealthWatcher(inference, sorted(self.config.models), settings.health_interval_s)
        watcher.start()
        self._stack.push_async_callback(watcher.stop)
        router = Router(self.config, load_routes(self.config), encoder.encode, watcher.is_healthy)
        self._stack.push_async_callback(router.close)
        await asyncio.to_thread(router.fit)
        servicer = RouterServicer(router)
        name = SERVICE_FULL_NAMES["router"]
        await self._serve("router", lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
                          [name], serving=[name])

    async def _start_context(self) -> None:
        import aiohttp

        from capibara_grpc.context.core import ContextEngine
        from capibara_grpc.context.memory import open_store
        from capibara_grpc.context.servicer import ContextServicer
        from capibara_grpc.context.tokens import ModelTokens

        store = await open_store(self.config.context.database, self.config.state_path)
        self._stack.push_async_callback(store.close)
        session = aiohttp.ClientSession()
        self._stack.push_async_callback(session.close)
        servicer = ContextServicer(ContextEngine(self.config, store, ModelTokens(self.config, session)))
        name = SERVICE_FULL_NAMES["context"]
        await self._serve("context", lambda server: context_pb2_grpc.add_ContextServiceServicer_to_server(servicer, server),
                          [name], serving=[name])

    async def _start_consensus(self) -> None:
        from capibara_grpc.consensus.core import ConsensusEngine
        from capibara_grpc.consensus.servicer import ConsensusServicer
        from capibara_grpc.router.encoder import shared_encoder

        encoder = await asyncio.to_thread(shared_encoder, self.config.consensus.encoder, self.config.router.cache_size)
        inference = internal_channel(self.config, "inference")
        self._stack.push_async_callback(inference.close)
        servicer = ConsensusServicer(ConsensusEngine(self.config, InferenceClient(inference).generate, encoder.encode))
        name = SERVICE_FULL_NAMES["consensus"]
        await self._serve("consensus", lambda server: consensus_pb2_grpc.add_ConsensusServiceServicer_to_server(servicer, server),
                          [name], serving=[name])

    async def _start_speech(self) -> None:
        from capibara_grpc.speech.core import Speech, build_engines
        from capibara_grpc.speech.servicer import SpeechServicer

        # A Coqui model takes seconds to load: off the event loop.
        engines = await asyncio.to_thread(build_engines, self.config)
        servicer = SpeechServicer(Speech(self.config, engines))
        name = SERVICE_FULL_NAMES["speech"]
        await self._serve("speech", lambda server: speech_pb2_grpc.add_SpeechServiceServicer_to_server(servicer, server),
                          [name], serving=[name])

    async def _response_cache(self):
        from capibara_grpc.gateway.cache import MemoryStore, RedisStore, ResponseCache, encoder_for

        settings = self.config.cache
        if not settings.enabled:
            return None
        if settings.backend == "redis":
            store = RedisStore(settings.redis_url)
            self._stack.push_async_callback(store.close)
        else:
            store = MemoryStore(settings.max_entries)
        encode = None
        if settings.semantic_routes:
            encode = await asyncio.to_thread(encoder_for, self.config.router.encoder, self.config.router.cache_size)
        return ResponseCache(settings, store, encode)

    async def _start_gateway(self) -> None:
        channels = {name: internal_channel(self.config, name) for name in self.config.deployed_services}
        for channel in channels.values():
            self._stack.push_async_callback(channel.close)
        router = RouterClient(channels["router"]).route if "router" in self.config.deployed_services else None
        context = ContextClient(channels["context"]) if "context" in self.config.deployed_services else None
        consensus = ConsensusClient(channels["consensus"]).decide if "consensus" in self.config.deployed_services else None
        speech = SpeechClient(channels["speech"]) if "speech" in self.config.deployed_services else None
        cache = await self._response_cache()
        chat = ChatServicer(ChatGateway(self.config, InferenceClient(channels["inference"]).generate, router, context,
                                        consensus, speech, cache))
        health_channels = {
            name: [health_channel(self.config, name, address) for address in
                   [self.config.services.address(name), *getattr(self.config.services, name).replicas]]
            for name in self.config.deployed_services
        }
        for channels_of_service in health_channels.values():
            for channel in channels_of_service:
                self._stack.push_async_callback(channel.close)
        mesh_health = MeshHealth(self.config, self.config.deployed_services, health_channels)
        mesh = MeshServicer(mesh_health)
        gateway_health = HealthServicer()

        def add(server):
            gateway_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
            gateway_pb2_grpc.add_MeshServiceServicer_to_server(mesh, server)

        # The front door describes the whole mesh, including services declared but not deployed.
        await self._serve("gateway", add, list(SERVICE_FULL_NAMES.values()) + [MESH_SERVICE], health=gateway_health,
                          serving=[SERVICE_FULL_NAMES["gateway"], MESH_SERVICE])
        watcher = asyncio.create_task(_watch_required(mesh_health, gateway_health))
        self._stack.push_async_callback(_cancel, watcher)
