"""`capibara mcp`: the mesh's MCP tools over stdio, for desktop assistants and IDEs that launch a
command. Every tool call goes through the edge over TLS, like `capibara chat`, with the API key
from $CAPIBARA_API_KEY: the edge's keys, rate limits and request ids apply as to any client.
Nothing but MCP may go to stdout; logs go to stderr."""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc

from capibara_grpc.mcp_server.tools import build_server

API_KEY_VARIABLE = "CAPIBARA_API_KEY"


async def serve(edge_channel: Callable[[], grpc.aio.Channel], generate_timeout_s: float) -> int:
    """Run until the client closes stdin. The edge's channel reaches every service (the edge
    routes each by its gRPC service name); it is opened here, in the running event loop."""
    edge = edge_channel()
    api_key = os.environ.get(API_KEY_VARIABLE, "").strip()
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    server = build_server(lambda _service: edge, metadata, generate_timeout_s)
    async with edge:
        await server.run_stdio_async()
    return 0
