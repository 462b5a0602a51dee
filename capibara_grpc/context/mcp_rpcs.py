"""ContextService's ListMcpTools and CallMcpTool: the MCP tools a chat has the mesh run (request
`mcp_tools`), over the sessions the context service keeps (mcp_sources.py). The gateway's loop
(gateway/capibara_gateway/mcp_tools.py) calls them.

These RPCs are reachable through the edge like every ContextService RPC, so they check the
configuration again (offer_tools; api_keys against the caller's key id, which the edge sets on
calls from outside). A call from the gateway carries no key id: the gateway checked the key.
"""

from __future__ import annotations

import dataclasses
import json
import time

from capibara_grpc import tracing
from capibara_grpc.config import mcp_offer
from capibara_grpc.errors import Unavailable
from capibara_grpc.stubs import context_pb2


class McpToolRpcs:
    """Mixed into ContextServicer, whose `engine` has the config and the McpSources (or None)."""

    def _mcp_allowed(self, names: list[str], context) -> list[tuple[str, str]]:
        servers = self.engine.config.context.mcp_servers
        key_id = tracing.key_id_from(context.invocation_metadata())
        if not key_id:  # from inside the mesh: the gateway checked the caller's key
            servers = {n: dataclasses.replace(s, api_keys=[]) for n, s in servers.items()}
        return mcp_offer.allowed(servers, names, key_id)

    def _mcp_sources(self):
        if self.engine.mcp is None:
            raise Unavailable("no MCP servers are configured (context.mcp_servers)")
        return self.engine.mcp

    async def ListMcpTools(self, request, context):
        asked = self._mcp_allowed(list(request.names), context)
        tools = self._mcp_sources().offered_tools(asked)
        return context_pb2.ListMcpToolsResponse(
            tools=[
                context_pb2.McpTool(
                    server=server, name=name, description=description, input_schema_json=json.dumps(schema)
                )
                for server, name, description, schema in tools
            ]
        )

    async def CallMcpTool(self, request, context):
        self._mcp_allowed([f"{request.server}.{request.name}"], context)
        sources = self._mcp_sources()
        started = time.perf_counter()
        try:
            arguments = json.loads(request.arguments_json or "{}")
        except ValueError as exc:
            arguments, text, is_error = None, f"the arguments are not valid JSON: {exc}", True
        if arguments is not None and not isinstance(arguments, dict):
            arguments, text, is_error = None, "the arguments must be a JSON object", True
        if arguments is not None:
            text, is_error = await sources.call_tool(request.server, request.name, arguments)
        limit = self.engine.config.context.mcp_tool_result_chars
        return context_pb2.CallMcpToolResponse(
            result=mcp_offer.cut(text, limit), is_error=is_error, ms=(time.perf_counter() - started) * 1000
        )
