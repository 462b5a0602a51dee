"""How a process starts the chat gateway (its row in capibara_grpc/services.py names `start`).

The gateway reaches every other deployed service over gRPC (through Envoy's mesh listener), asks
each for its health directly, and is NOT_SERVING while a service it cannot chat without is down.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from capibara_gateway.cache import MemoryStore, RedisStore, ResponseCache, encoder_for
from capibara_gateway.core import ChatGateway
from capibara_gateway.health import MeshHealth
from capibara_gateway.openai_servicer import OpenAIServicer
from capibara_gateway.servicer import ChatServicer, MeshServicer
from capibara_gateway.status import MeshStatus
from capibara_gateway.status_probes import run_sampler
from capibara_grpc.consensus.client import ConsensusClient
from capibara_grpc.context.client import ContextClient
from capibara_grpc.inference.client import InferenceClient
from capibara_grpc.mcp_server import http as mcp_http
from capibara_grpc.router.client import RouterClient
from capibara_grpc.server import SERVING, MeshServers, health_channel, internal_channels
from capibara_grpc.services import REQUIRED_BY_GATEWAY
from capibara_grpc.speech.client import SpeechClient
from capibara_grpc.stubs import GATEWAY_EXTRA_SERVICES, SERVICE_FULL_NAMES, gateway_pb2_grpc, openai_pb2_grpc

log = logging.getLogger(__name__)


async def start(servers: MeshServers) -> None:
    config = servers.config
    deployed = config.deployed_services
    channels = internal_channels(servers)
    router = RouterClient(channels["router"]).route if "router" in deployed else None
    context = ContextClient(channels["context"]) if "context" in deployed else None
    consensus = ConsensusClient(channels["consensus"]).decide if "consensus" in deployed else None
    speech = SpeechClient(channels["speech"]) if "speech" in deployed else None
    cache = await response_cache(servers)
    status = MeshStatus(sorted(config.models), {name: SERVICE_FULL_NAMES[name] for name in deployed})
    gateway = ChatGateway(
        config, InferenceClient(channels["inference"]).generate, router, context, consensus, speech, cache, status.chats
    )
    chat = ChatServicer(gateway)
    embed = RouterClient(channels["router"]).embed if "router" in deployed else None
    openai = OpenAIServicer(gateway, embed, speech)
    health_channels = {
        name: [
            health_channel(config, name, address)
            for address in [config.services.address(name), *config.services.endpoint(name).replicas]
        ]
        for name in deployed
    }
    for channels_of_service in health_channels.values():
        for channel in channels_of_service:
            servers.on_stop(channel.close)
    mesh_health = MeshHealth(config, deployed, health_channels)
    mesh = MeshServicer(mesh_health, status)
    gateway_health = HealthServicer()

    def add(server):
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
        gateway_pb2_grpc.add_MeshServiceServicer_to_server(mesh, server)
        openai_pb2_grpc.add_OpenAIServiceServicer_to_server(openai, server)

    # The front door describes the whole mesh, including services declared but not deployed.
    await servers.serve(
        "gateway",
        add,
        reflected=list(SERVICE_FULL_NAMES.values()) + list(GATEWAY_EXTRA_SERVICES),
        health=gateway_health,
        serving=[SERVICE_FULL_NAMES["gateway"], *GATEWAY_EXTRA_SERVICES],
    )
    watcher = asyncio.create_task(watch_required(mesh_health, gateway_health))
    servers.on_stop(_cancel, watcher)
    # MCP over Streamable HTTP, behind the edge's /mcp route (capibara_grpc/mcp_server/http.py).
    await mcp_http.start(servers)
    sampler = asyncio.create_task(run_sampler(status, mesh_health, config))
    servers.on_stop(_cancel, sampler)


async def response_cache(servers: MeshServers) -> ResponseCache | None:
    """The response cache of cache.*, or None when it is off."""
    settings = servers.config.cache
    if not settings.enabled:
        return None
    if settings.backend == "redis":
        store = RedisStore(settings.redis_url)
        servers.on_stop(store.close)
    else:
        store = MemoryStore(settings.max_entries)
    encode = None
    if settings.semantic_routes:
        router = servers.config.router
        encode = await asyncio.to_thread(encoder_for, router.encoder, router.cache_size)
    return ResponseCache(settings, store, encode)


async def watch_required(mesh_health: MeshHealth, health: HealthServicer, interval_s: float = 2.0) -> None:
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
