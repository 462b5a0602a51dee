"""Which MCP tools a chat may have the mesh run (request `mcp_tools`), from the configuration alone.

Shared by the gateway (which refuses a request naming anything else with 400, before it starts)
and the context service (which checks again before it lists or calls: its RPCs are reachable
through the edge too). No I/O: the server's own tool list is the context service's.
"""

from __future__ import annotations

import re

from capibara_grpc.config.schema import McpServerConfig
from capibara_grpc.errors import InvalidField

EVERY_TOOL = "*"
FIELD = "mcp_tools"
# OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$.
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


def offers(server: McpServerConfig, tool: str) -> bool:
    return server.offer_tools == [EVERY_TOOL] or tool in server.offer_tools


def allowed(servers: dict[str, McpServerConfig], names: list[str], key_id: str) -> list[tuple[str, str]]:
    """(server, tool or "" for every tool it offers) of each requested name, in order; InvalidField
    naming the first one that is not configured, not offered, or not for this API key."""
    asked: list[tuple[str, str]] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidField(FIELD, "each entry is '<server>' or '<server>.<tool>'")
        server_name, _, tool = name.partition(".")
        server = servers.get(server_name)
        shown = name[:80]
        if server is None or not server.offer_tools:
            raise InvalidField(
                FIELD,
                f"'{shown}': no MCP server '{server_name[:64]}' offers tools in this mesh "
                f"(offering: {', '.join(n for n, s in servers.items() if s.offer_tools) or 'none'})",
            )
        if tool and not offers(server, tool):
            raise InvalidField(
                FIELD,
                f"'{shown}': the tool '{tool[:64]}' is not offered by '{server_name}' "
                f"(offer_tools: {', '.join(server.offer_tools)})",
            )
        if server.api_keys and key_id not in server.api_keys:
            raise InvalidField(FIELD, f"'{shown}': the tools of '{server_name}' are not available to this API key")
        if (server_name, tool) not in asked:
            asked.append((server_name, tool))
    return asked


def function_name(server: str, tool: str) -> str:
    """The name the model sees: <server>__<tool>, in the characters OpenAI allows, at most 64."""
    return _NOT_IN_NAME.sub("_", f"{server}__{tool}")[:64]


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    kept = limit
    for _ in range(3):  # the note's length depends on the count it gives
        note = f"\n[cut: {len(text) - kept} of {len(text)} characters left out]"
        kept = max(0, limit - len(note))
    return text[:kept] + f"\n[cut: {len(text) - kept} of {len(text)} characters left out]"
