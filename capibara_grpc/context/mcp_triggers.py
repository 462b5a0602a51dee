"""When a configured MCP tool or resource is used, with which arguments, and how its result reads
in the prompt. Pure functions of the message, the route and the tool's schema: no I/O.

A use (tool or resource) fires when the chat's route is one of its `routes` and/or one of its
`patterns` matches the normalized message (both, when both are given). A tool's arguments come
from the pattern's named groups or the whole message, and only those the tool's inputSchema lists;
a tool whose required arguments the message cannot fill is not called (a wrong call is worse than
none).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from capibara_grpc.context.addition import Addition
from capibara_grpc.text import normalize

WHOLE_MESSAGE = "message"
# JSON Schema types an argument taken from text can be converted to.
_CONVERSIONS = {"string": str, "integer": int, "number": float}


@dataclass(frozen=True)
class Use:
    """One tool to call or resource to read, as configured under context.mcp_servers.<server>."""

    server: str
    name: str  # the tool's name, or the resource's configured key
    routes: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern, ...] = ()
    arguments: dict[str, str] = field(default_factory=dict)  # tool argument -> group or "message"
    uri: str = ""  # set for a resource

    @property
    def kind(self) -> str:
        return f"mcp:{self.server}/{self.name}"

    @property
    def is_resource(self) -> bool:
        return bool(self.uri)


@dataclass(frozen=True)
class Hit:
    """Why a use fired, and the named groups of the pattern that matched."""

    reason: str
    groups: dict[str, str]


def uses_of(server_name: str, server) -> list[Use]:
    """The uses of one McpServerConfig (validated already: patterns compile)."""
    uses = [
        Use(server_name, tool, frozenset(c.routes), tuple(re.compile(p) for p in c.patterns), dict(c.arguments))
        for tool, c in server.tools.items()
    ]
    uses += [
        Use(server_name, key, frozenset(c.routes), tuple(re.compile(p) for p in c.patterns), uri=c.uri)
        for key, c in server.resources.items()
    ]
    return uses


def fires(use: Use, normalized: str, route: str) -> Hit | None:
    """The hit when `use` is relevant to this message and route, else None."""
    if not use.routes and not use.patterns:
        return None
    reasons = []
    if use.routes:
        if route not in use.routes:
            return None
        reasons.append(f"the route is {route}")
    groups: dict[str, str] = {}
    if use.patterns:
        match = next((m for p in use.patterns if (m := p.search(normalized))), None)
        if match is None:
            return None
        groups = {k: v.strip() for k, v in match.groupdict().items() if v and v.strip()}
        reasons.append(f"the message matches ('{match.group(0)}')")
    return Hit(" and ".join(reasons), groups)


def tool_arguments(use: Use, hit: Hit, message: str, input_schema: dict) -> dict | None:
    """The arguments to call the tool with; None when a required one cannot be filled."""
    properties = input_schema.get("properties") or {}
    arguments = {}
    for argument, source in use.arguments.items():
        if argument not in properties:
            continue  # the tool does not take it (logged when the session opens)
        text = message.strip() if source == WHOLE_MESSAGE else hit.groups.get(source, "")
        if not text:
            continue
        convert = _CONVERSIONS.get((properties[argument] or {}).get("type", "string"))
        if convert is None:
            continue
        try:
            arguments[argument] = convert(text)
        except ValueError:
            continue
    if any(name not in arguments for name in input_schema.get("required") or []):
        return None
    return arguments


def unknown_arguments(arguments: dict[str, str], input_schema: dict) -> list[str]:
    """Configured arguments (a use's `arguments`) the tool's schema does not list (never sent)."""
    properties = input_schema.get("properties") or {}
    return [a for a in arguments if a not in properties]


def bounded(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + f" … (cut at {limit} of {len(text)} characters)"


def tool_text(result) -> str:
    """The text of a CallToolResult: its text blocks, else its structured content as JSON."""
    parts = [block.text for block in result.content if getattr(block, "type", "") == "text"]
    if not parts and result.structured_content is not None:
        parts = [json.dumps(result.structured_content, ensure_ascii=False)]
    return "\n".join(p for p in parts if p.strip())


def resource_text(result) -> str:
    """The text of a ReadResourceResult (binary contents are left out)."""
    return "\n".join(c.text for c in result.contents if getattr(c, "text", None))


def addition(use: Use, hit: Hit, text: str, arguments: dict | None, limit: int) -> Addition:
    if use.is_resource:
        what, done = f"MCP resource {use.server}/{use.name} ({use.uri})", f"resource {use.uri} read"
    else:
        shown = ", ".join(f"{k}={v!r}" for k, v in (arguments or {}).items())
        what, done = f"MCP tool {use.server}/{use.name}({shown})", f"tool {use.name}({shown}) called"
    return Addition(use.kind, f"{what}:\n{bounded(text, limit)}", f"{hit.reason}: {done}")


def normalized(message: str) -> str:
    return normalize(message)
