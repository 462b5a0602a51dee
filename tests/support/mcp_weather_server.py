"""A small MCP server for the tests, written with the official SDK (`mcp`), over stdio or HTTP.

    python -m tests.support.mcp_weather_server --transport stdio --log calls.jsonl
    python -m tests.support.mcp_weather_server --transport http --port 31090 --log calls.jsonl

Its answers prove what it was asked: `forecast` names the city it was given, beside a marker no
model would write (FORECAST_MARKER). Every call and read is appended to `--log` (one JSON line),
so a test can also check that nothing was called for a message that needed nothing.

Fault modes: `--hang` makes every tool call wait forever (the server stays connected);
`--crash-after N` makes the process exit abruptly on its Nth tool call, before answering it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from mcp.server.mcpserver import MCPServer

FORECAST_MARKER = "capibara-weather-7f3a"
RATE_MARKER = "capibara-rates-91c2"
STYLE_MARKER = "capibara-style-5d08"
ECHO_MARKER = "capibara-echo-33b1"


def build(log_path: str, hang: bool, crash_after: int) -> MCPServer:
    server = MCPServer("capibara-test-weather")
    calls = 0

    def record(kind: str, name: str, arguments: dict) -> None:
        if log_path:
            with open(log_path, "a") as log:
                log.write(json.dumps({"kind": kind, "name": name, "arguments": arguments, "pid": os.getpid()}) + "\n")

    async def before_call(name: str, arguments: dict) -> None:
        nonlocal calls
        calls += 1
        record("tool", name, arguments)
        if crash_after and calls >= crash_after:
            os._exit(3)  # a crash: no answer, no goodbye
        if hang:
            await asyncio.sleep(3600)

    @server.tool(description="Weather forecast for a city.")
    async def forecast(city: str) -> str:
        await before_call("forecast", {"city": city})
        return f"Forecast for {city.title()}: sunny, 23 °C, light wind ({FORECAST_MARKER})."

    @server.tool(description="Exchange rate of a currency against the euro.")
    async def exchange_rate(currency: str) -> str:
        await before_call("exchange_rate", {"currency": currency})
        return f"1 EUR = 1.08 {currency.upper()} ({RATE_MARKER})."

    @server.tool(description="Repeats the text it is given.")
    async def echo(text: str) -> str:
        await before_call("echo", {"text": text})
        return f"Echo: {text} ({ECHO_MARKER})"

    @server.resource("notes://style-guide", description="The team's coding style guide.", mime_type="text/plain")
    def style_guide() -> str:
        record("resource", "notes://style-guide", {})
        return f"Style guide: type hints everywhere, functions under 40 lines ({STYLE_MARKER})."

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", default="")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    server = build(args.log, args.hang, args.crash_after)
    if args.log:
        with open(args.log, "a") as log:
            log.write(json.dumps({"kind": "start", "pid": os.getpid(), "time": time.time()}) + "\n")
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
