"""The context service as an MCP client (context.mcp_servers): tools and resources as context.

One long-lived session per configured server, opened in the background when the service starts
(a chat never waits for it) and reopened with backoff when it dies: a stdio server that crashed is
started again, an HTTP server is called again until it answers. A chat uses the sessions that are
open; a call that fails or outlasts the server's `timeout_s` is logged (once per episode),
counted in capibara_mcp_calls_total and left out, and the chat goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from capibara_grpc import metrics
from capibara_grpc.config import mcp_offer
from capibara_grpc.config.schema import McpServerConfig
from capibara_grpc.context import mcp_triggers as triggers
from capibara_grpc.context.addition import Addition
from capibara_grpc.telemetry import spans

log = logging.getLogger(__name__)
# The SDK's HTTP client logs every request at INFO: the idle checks would fill the logs.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# Opening a session (start the command or reach the URL, handshake, list the tools).
OPEN_TIMEOUT_S = 20.0
# How often an idle session is checked (tools/list), so that a dead server is noticed and
# reconnected before a chat needs it.
PROBE_INTERVAL_S = 10.0
FIRST_RETRY_S = 1.0
# Tool listings are paginated; a server that never ends its listing cannot hold the session.
MAX_TOOL_PAGES = 20


class Unavailable(Exception):
    """No open session with the server, or the server does not offer that tool."""


class ServerSession:
    """The session with one MCP server, kept open by a background task."""

    def __init__(self, name: str, config: McpServerConfig):
        self.name = name
        self.config = config
        self.client: Client | None = None
        self.tool_schemas: dict[str, dict] = {}
        self.tool_descriptions: dict[str, str] = {}
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._down_since_logged = False  # one log line per outage

    @property
    def target(self) -> str:
        if self.config.url:
            return self.config.url
        return " ".join([self.config.command, *self.config.args])

    def _server(self):
        if self.config.url:
            return self.config.url
        return StdioServerParameters(command=self.config.command, args=self.config.args, env=self.config.env or None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_open(), name=f"mcp session {self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_open(self) -> None:
        delay = FIRST_RETRY_S
        while True:
            opened = False
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(OPEN_TIMEOUT_S):
                        client = await stack.enter_async_context(Client(self._server(), cache=None))
                        self.tool_schemas = await self._list_tools(client)
                    opened = True
                    self._opened(client)
                    delay = FIRST_RETRY_S
                    why = await self._watch(client)
                    self.client = None
                    raise ConnectionError(why)
            except asyncio.CancelledError:
                if self._stopping:
                    raise
                self._down("the session was cancelled by its transport", opened)  # the transport died
            except Exception as exc:  # noqa: BLE001 - whatever the server did, the session is reopened
                self._down(_describe(exc), opened)
            finally:
                self.client = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _list_tools(self, client: Client) -> dict[str, dict]:
        schemas, descriptions, cursor = {}, {}, None
        for _ in range(MAX_TOOL_PAGES):
            page = await client.list_tools(cursor=cursor)
            schemas |= {tool.name: tool.input_schema or {} for tool in page.tools}
            descriptions |= {tool.name: tool.description or "" for tool in page.tools}
            cursor = page.next_cursor
            if cursor is None:
                break
        self.tool_descriptions = descriptions
        return schemas

    def _opened(self, client: Client) -> None:
        self._lost.clear()
        self.client = client
        self._down_since_logged = False
        metrics.MCP_SESSIONS.labels(self.name, "opened").inc()
        log.info("mcp server %s: session open (%s), %d tools", self.name, self.target, len(self.tool_schemas))
        for tool, config in self.config.tools.items():
            schema = self.tool_schemas.get(tool)
            if schema is None:
                log.warning("mcp server %s does not offer the configured tool '%s'", self.name, tool)
                continue
            if unknown := triggers.unknown_arguments(config.arguments, schema):
                log.warning("mcp server %s: tool %s takes no argument %s; not sent", self.name, tool, unknown)

    def _down(self, why: str, was_open: bool) -> None:
        metrics.MCP_SESSIONS.labels(self.name, "lost" if was_open else "failed").inc()
        if was_open or not self._down_since_logged:
            log.warning(
                "mcp server %s (%s) %s: %s; reconnecting with backoff up to %g s",
                self.name,
                self.target,
                "lost" if was_open else "cannot be reached",
                why,
                self.config.reconnect_max_s,
            )
        self._down_since_logged = True

    async def _watch(self, client: Client) -> str:
        """Returns (why) when the session is lost: a call found it closed, or the idle check failed."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), PROBE_INTERVAL_S)
                return "a call found the connection closed"
            try:
                await asyncio.wait_for(client.list_tools(), self.config.timeout_s)
            except TimeoutError:
                continue  # slow, not dead: calls time out on their own
            except Exception as exc:  # noqa: BLE001 - any other failure of the check means the session is gone
                return f"the idle check failed ({_describe(exc)})"

    def _span(self, method: str, target: str, attributes: dict):
        """The span of one MCP request (OpenTelemetry's MCP conventions: "{method} {target}")."""
        return spans.span(
            f"{method} {target}",
            spans.CLIENT,
            {"mcp.method.name": method, "capibara.mcp.server": self.name, **attributes},
        )

    def _tool_span(self, tool: str):
        return self._span("tools/call", tool, {"gen_ai.tool.name": tool, "gen_ai.operation.name": "execute_tool"})

    async def use(self, use: triggers.Use, arguments: dict | None) -> str:
        """The text of one tool call or resource read; raises on failure or past the timeout."""
        if use.is_resource:
            with self._span("resources/read", use.uri, {"mcp.resource.uri": use.uri}):
                return await self._use(use, arguments)
        with self._tool_span(use.name):
            return await self._use(use, arguments)

    async def _use(self, use: triggers.Use, arguments: dict | None) -> str:
        client = self.client
        if client is None:
            raise Unavailable(f"no open session with {self.name}")
        try:
            if use.is_resource:
                result = await asyncio.wait_for(client.read_resource(use.uri), self.config.timeout_s)
                return triggers.resource_text(result)
            if use.name not in self.tool_schemas:
                raise Unavailable(f"{self.name} does not offer a tool '{use.name}'")
            result = await asyncio.wait_for(client.call_tool(use.name, arguments), self.config.timeout_s)
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self._lost.set()
            raise
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            self._lost.set()
            raise
        if result.is_error:
            raise MCPError(0, f"the tool answered an error: {triggers.tool_text(result)[:200]}")
        return triggers.tool_text(result)

    async def call(self, tool: str, arguments: dict) -> tuple[str, bool]:
        """(text, is_error) of a call the model asked for (request mcp_tools): every failure is a
        result the model reads, never an exception."""
        with self._tool_span(tool[:64]) as span:
            text, is_error = await self._call(tool, arguments)
            if is_error:
                span.fail(text[:200])
        return text, is_error

    async def _call(self, tool: str, arguments: dict) -> tuple[str, bool]:
        client = self.client
        if client is None:
            return f"the MCP server {self.name} is not connected", True
        if tool not in self.tool_schemas:
            return f"{self.name} has no tool '{tool[:64]}'", True
        try:
            result = await asyncio.wait_for(client.call_tool(tool, arguments), self.config.timeout_s)
        except TimeoutError:
            return f"no answer within {self.config.timeout_s:g} s", True
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            self._lost.set()
            return f"the connection to {self.name} was lost ({_describe(exc)})", True
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self._lost.set()
            return f"the tool failed: {exc}"[:2000], True
        except Exception as exc:  # noqa: BLE001 - whatever the server did, the model is told
            return f"the tool failed: {_describe(exc)}", True
        return triggers.tool_text(result), bool(result.is_error)


class McpSources:
    """Every configured MCP server: which of their tools and resources a message needs, and what
    they answer, as additions to the prompt."""

    def __init__(self, servers: dict[str, McpServerConfig]):
        self.sessions = {name: ServerSession(name, config) for name, config in servers.items()}
        self.uses = [use for name, config in servers.items() for use in triggers.uses_of(name, config)]
        self._failing: set[str] = set()

    def start(self) -> None:
        for session in self.sessions.values():
            session.start()

    async def stop(self) -> None:
        await asyncio.gather(*(session.stop() for session in self.sessions.values()))

    async def additions(self, message: str, route: str) -> list[Addition]:
        """What the relevant tools and resources answer; those that fail are left out."""
        text = triggers.normalized(message)
        hits = [(use, hit) for use in self.uses if (hit := triggers.fires(use, text, route))]
        if not hits:
            return []
        results = await asyncio.gather(*(self._use(use, hit, message) for use, hit in hits))
        return [addition for addition in results if addition is not None]

    async def _use(self, use: triggers.Use, hit: triggers.Hit, message: str) -> Addition | None:
        session = self.sessions[use.server]
        arguments = None
        try:  # everything that involves what the server said: a server never fails the chat
            if not use.is_resource and use.name in session.tool_schemas:
                arguments = triggers.tool_arguments(use, hit, message, session.tool_schemas[use.name])
                if arguments is None:
                    log.info("%s not called: %s, but no value for a required argument", use.kind, hit.reason)
                    return None
            text = await session.use(use, arguments)
        except Unavailable as exc:
            return self._failed(use, "unavailable", str(exc))
        except TimeoutError:
            return self._failed(use, "timeout", f"no answer within {session.config.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - a failing server never fails the chat
            return self._failed(use, "error", _describe(exc))
        metrics.MCP_CALLS.labels(use.server, use.name, "ok").inc()
        if use.kind in self._failing:
            self._failing.discard(use.kind)
            log.info("%s answers again", use.kind)
        if not text.strip():
            return None
        log.info("%s added to the prompt (%d characters): %s", use.kind, len(text), hit.reason)
        return triggers.addition(use, hit, text, arguments, session.config.max_result_chars)

    def offered_tools(self, asked: list[tuple[str, str]]) -> list[tuple[str, str, str, dict]]:
        """(server, tool, description, input schema) of what `asked` (mcp_offer.allowed) names, as
        the servers list them now; Unavailable naming a server that is not connected or a tool it
        does not list."""
        tools = []
        for server, tool in asked:
            session = self.sessions[server]
            if session.client is None:
                raise Unavailable(f"the MCP server '{server}' is not connected (yet)")
            names = [tool] if tool else [t for t in session.tool_schemas if mcp_offer.offers(session.config, t)]
            for name in names:
                if name not in session.tool_schemas:
                    raise Unavailable(f"the MCP server '{server}' does not list a tool '{name}'")
                tools.append((server, name, session.tool_descriptions.get(name, ""), session.tool_schemas[name]))
        return tools

    async def call_tool(self, server: str, tool: str, arguments: dict) -> tuple[str, bool]:
        """(text, is_error) of one call the model made; counted in capibara_mcp_calls_total."""
        session = self.sessions[server]
        text, is_error = await session.call(tool, arguments)
        outcome = "ok" if not is_error else "timeout" if text.startswith("no answer within") else "error"
        metrics.MCP_CALLS.labels(server, tool if tool in session.tool_schemas else "-", outcome).inc()
        log.info("mcp tool %s/%s run for the model: %s (%d characters)", server, tool[:64], outcome, len(text))
        return text, is_error

    def _failed(self, use: triggers.Use, outcome: str, why: str) -> None:
        metrics.MCP_CALLS.labels(use.server, use.name, outcome).inc()
        if use.kind not in self._failing:
            self._failing.add(use.kind)
            log.warning("%s left out of the prompt (%s): %s; the chat goes on without it", use.kind, outcome, why)
        return None


def _describe(exc: BaseException) -> str:
    """One line for a failure, an exception group's first leaf included."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:300]
