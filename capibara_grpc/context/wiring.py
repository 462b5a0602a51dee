"""How a process starts the context service (its row in capibara_grpc/services.py names `start`)."""

from __future__ import annotations

import aiohttp

from capibara_grpc.context.core import ContextEngine
from capibara_grpc.context.memory import open_store
from capibara_grpc.context.servicer import ContextServicer
from capibara_grpc.context.tokens import ModelTokens
from capibara_grpc.server import MeshServers
from capibara_grpc.stubs import context_pb2_grpc


async def start(servers: MeshServers) -> None:
    config = servers.config
    store = await open_store(config.context.database, config.state_path)
    servers.on_stop(store.close)
    # Token counts come from each model's own tokenizer (its server's /tokenize).
    session = aiohttp.ClientSession()
    servers.on_stop(session.close)
    # MCP sessions open in the background: the service serves at once, without them until they are up.
    mcp = None
    if config.context.mcp_servers:
        from capibara_grpc.context.mcp_sources import McpSources  # the MCP SDK, only when used

        mcp = McpSources(config.context.mcp_servers)
        mcp.start()
        servers.on_stop(mcp.stop)
    servicer = ContextServicer(ContextEngine(config, store, ModelTokens(config, session), mcp))
    await servers.serve(
        "context", lambda server: context_pb2_grpc.add_ContextServiceServicer_to_server(servicer, server)
    )
