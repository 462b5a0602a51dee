"""What an MCP tool costs the context service: one weather question through McpSources.additions
(trigger, argument, tools/call over the kept session, result formatted) against opening a new
session for every call, which is what keeping sessions saves; and how long a message waits for a
hung server (its timeout_s, then the chat goes on). The server is tests/support/mcp_weather_server.py
over stdio and over Streamable HTTP, on loopback.

    .venv/bin/python benchmarks/mcp_sessions.py [--calls 200]

A benchmark, not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from benchmarks.mcp_tools import percentiles  # noqa: E402
from capibara_grpc.config.schema import McpServerConfig, McpToolConfig  # noqa: E402
from capibara_grpc.context.mcp_sources import McpSources  # noqa: E402

SERVER = ["-m", "tests.support.mcp_weather_server"]
HTTP_PORT = 31195
QUESTION = "¿Qué tiempo hace en Málaga?"
TOOL = McpToolConfig(patterns=[r"\bque tiempo hace en (?P<city>[a-z]+)"], arguments={"city": "city"})


async def kept_session(config: McpServerConfig, calls: int) -> list[float]:
    sources = McpSources({"weather": config})
    sources.start()
    try:
        while sources.sessions["weather"].client is None:
            await asyncio.sleep(0.05)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            added = await sources.additions(QUESTION, "")
            samples.append(time.perf_counter() - started)
            assert added and "Malaga" in added[0].content, added
        return samples
    finally:
        await sources.stop()


async def new_session_per_call(server, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        async with Client(server, cache=None) as client:
            await client.call_tool("forecast", {"city": "malaga"})
        samples.append(time.perf_counter() - started)
    return samples


def start_http_server() -> subprocess.Popen:
    argv = [sys.executable, *SERVER, "--transport", "http", "--port", str(HTTP_PORT)]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/mcp", timeout=1)
        except urllib.error.HTTPError:
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the MCP test server did not start over HTTP")


async def main(calls: int) -> None:
    stdio = McpServerConfig(command=sys.executable, args=SERVER, tools={"forecast": TOOL})
    hung = McpServerConfig(command=sys.executable, args=[*SERVER, "--hang"], timeout_s=1.0, tools={"forecast": TOOL})
    url = f"http://127.0.0.1:{HTTP_PORT}/mcp"
    http = McpServerConfig(url=url, tools={"forecast": TOOL})
    rows = [("stdio, kept session (McpSources.additions)", await kept_session(stdio, calls))]
    rows.append(
        (
            "stdio, a new session per call",
            await new_session_per_call(
                StdioServerParameters(command=sys.executable, args=SERVER, cwd=str(REPO)), max(5, calls // 20)
            ),
        )
    )
    process = start_http_server()
    try:
        rows.append(("HTTP, kept session (McpSources.additions)", await kept_session(http, calls)))
        rows.append(("HTTP, a new session per call", await new_session_per_call(url, max(5, calls // 20))))
    finally:
        process.kill()
        process.wait()
    rows.append(("stdio, hung server (timeout_s 1)", await kept_session_hung(hung)))
    for name, samples in rows:
        print(f"{name:45s} {percentiles(samples)}")


async def kept_session_hung(config: McpServerConfig, calls: int = 5) -> list[float]:
    sources = McpSources({"weather": config})
    sources.start()
    try:
        while sources.sessions["weather"].client is None:
            await asyncio.sleep(0.05)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            assert await sources.additions(QUESTION, "") == []
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await sources.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    asyncio.run(main(parser.parse_args().calls))
