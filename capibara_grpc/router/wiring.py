"""How a process starts the router service (its row in capibara_grpc/services.py names `start`).

Imported only by a process that runs the router: loading torch and sentence-transformers takes
seconds and memory.
"""

from __future__ import annotations

import asyncio

from capibara_grpc.config import load_routes
from capibara_grpc.router.core import Router
from capibara_grpc.router.servicer import ModelHealthWatcher, RouterServicer
from capibara_grpc.sentence_encoder import shared_encoder
from capibara_grpc.server import MeshServers, health_channel
from capibara_grpc.stubs import router_pb2_grpc


async def start(servers: MeshServers) -> None:
    config = servers.config
    settings = config.router
    encoder = await asyncio.to_thread(shared_encoder, settings.encoder, settings.cache_size)
    # Which models are up, straight from the inference service's grpc.health.v1.
    inference = health_channel(config, "inference")
    servers.on_stop(inference.close)
    watcher = ModelHealthWatcher(inference, sorted(config.models), settings.health_interval_s)
    watcher.start()
    servers.on_stop(watcher.stop)
    router = Router(config, load_routes(config), encoder.encode, watcher.is_healthy)
    servers.on_stop(router.close)
    await asyncio.to_thread(router.fit)
    servicer = RouterServicer(router, encoder)
    await servers.serve("router", lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server))
