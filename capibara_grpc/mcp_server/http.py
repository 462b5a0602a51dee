"""MCP over Streamable HTTP, served by the gateway's process behind the edge's /mcp route.

It listens on loopback (services.host) at `http_port(config)`; only Envoy reaches it, so the API
key check, the per-client rate limit, TLS and x-request-id of the edge apply to it as to every
other call. It runs in the gateway's process and event loop (started by the gateway's wiring):
no extra process to supervise, and a gateway replica brings its own (port + 10).

Choices, deliberately:
- Stateless: every POST carries a whole exchange, so Envoy may send any request to any gateway
  replica and a restarted gateway loses nothing. The tools need no server-to-client requests.
- Responses as SSE (the SDK's default): Envoy's route has no timeout and the edge passes the
  stream through unbuffered (the Lua guard reads no body outside the REST paths it checks).
- No DNS-rebinding Host/Origin check: the SDK enables one for a loopback bind and would answer 421
  to any Host but localhost, i.e. to the edge's public name. The check protects an unauthenticated
  plain-HTTP server on a user's machine from pages that rebind a name to 127.0.0.1; here nothing
  but Envoy connects, and Envoy serves TLS with the mesh's certificate (a rebound name fails the
  certificate check) and requires an API key when keys are configured. Browser origins are the
  edge's CORS policy's business, as for the REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from capibara_grpc.config.mcp_endpoint import PATH, http_port
from capibara_grpc.mcp_server.tools import build_server
from capibara_grpc.server import MeshServers, internal_channels

log = logging.getLogger(__name__)

# What Envoy's cluster health check asks.
HEALTH_PATH = "/health"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the mesh's own event loop. The process (`capibara up` / `serve`) owns
    SIGINT and SIGTERM and stops its services itself: uvicorn must not take them over."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start(servers: MeshServers) -> None:
    """Serve MCP over HTTP in this process until its services stop."""
    config = servers.config
    channels = internal_channels(servers)
    mcp = build_server(channels.get, generate_timeout_s=config.gateway.default_deadline_s)

    @mcp.custom_route(HEALTH_PATH, methods=["GET"])
    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = mcp.streamable_http_app(
        streamable_http_path=PATH,
        stateless_http=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host=config.services.host,
    )
    port = http_port(config)
    # Bound here, so a port in use fails this start like any service's port (uvicorn would exit).
    # IPPROTO_TCP spelt out: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # an SSE answer's last small write waited for Envoy's delayed ACK (about 40 ms, one call in two).
    family = socket.AF_INET6 if ":" in config.services.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.services.host, port))
    except OSError as exc:
        listener.close()
        raise OSError(f"cannot listen on {config.services.host}:{port} for MCP over HTTP ({exc.strerror})") from exc
    # Envoy logs every request; uvicorn's own log config would replace the mesh's. Calls still
    # running when the mesh stops get the gRPC servers' grace too, then are cancelled.
    server = _EmbeddedServer(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    )
    task = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if task.done():
        listener.close()
        raise RuntimeError(f"MCP over HTTP did not start: {task.exception()!r}")

    async def stop() -> None:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        listener.close()

    servers.on_stop(stop)
    log.info(
        "MCP over Streamable HTTP on http://%s:%d%s (behind the edge's %s)", config.services.host, port, PATH, PATH
    )
