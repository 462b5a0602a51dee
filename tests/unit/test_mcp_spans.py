"""The context service's MCP requests as spans (docs/tracing.md): a real MCP server written with
the official SDK (tests/support/mcp_weather_server.py) over stdio, the context service's MCP
client (capibara_grpc/context/mcp_sources.py), and the spans exported to the real OTLP receiver."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import pytest

from capibara_grpc.config.schema import TracingConfig
from capibara_grpc.context.mcp_sources import McpSources
from capibara_grpc.telemetry import install, spans
from capibara_grpc.telemetry.receiver import OtlpReceiver
from capibara_grpc.telemetry.settings import resolve
from tests.support.mcp_weather_server import FORECAST_MARKER, STYLE_MARKER
from tests.unit.test_mcp_sources import SERVER

pytestmark = pytest.mark.unit


async def test_each_mcp_request_of_a_sampled_chat_is_a_client_span_under_it():
    weather = dataclasses.replace(SERVER, command=sys.executable, args=["-m", "tests.support.mcp_weather_server"])
    sources = McpSources({"weather": weather})
    sources.start()
    try:
        async with asyncio.timeout(30):
            while sources.sessions["weather"].client is None:
                await asyncio.sleep(0.05)
        async with OtlpReceiver() as receiver:
            uninstall = await install(resolve(TracingConfig(endpoint=receiver.endpoint, schedule_delay_ms=50), {}), "x")
            try:
                enrich = spans.TRACER.start("capibara.context.v1.ContextService/Enrich", spans.SERVER, None, "context")
                token = spans.current.set(enrich)
                added = await sources.additions("What's the weather like in Paris? Show me some code", "programming")
                text, is_error = await sources.call_tool("weather", "no_such_tool", {})
                spans.current.reset(token)
                enrich.end()
                received = await receiver.wait_for(lambda got: got if len(got) == 4 else None, 10)
            finally:
                await uninstall()
    finally:
        await sources.stop()
    assert any(FORECAST_MARKER in a.content for a in added) and any(STYLE_MARKER in a.content for a in added)
    assert is_error and "no_such_tool" in text
    by_name = {s.name: s for s in received}
    root = by_name["capibara.context.v1.ContextService/Enrich"]
    forecast, style, refused = (
        by_name["tools/call forecast"],
        by_name["resources/read notes://style-guide"],
        by_name["tools/call no_such_tool"],
    )
    for span in (forecast, style, refused):
        assert (span.kind, span.parent_span_id, span.service) == ("CLIENT", root.span_id, "capibara-context")
        assert span.attributes["capibara.mcp.server"] == "weather"
    assert (
        forecast.attributes["mcp.method.name"] == "tools/call" and forecast.attributes["gen_ai.tool.name"] == "forecast"
    )
    assert forecast.status_code != "ERROR"
    assert style.attributes["mcp.resource.uri"] == "notes://style-guide"
    assert refused.status_code == "ERROR" and "no_such_tool" in refused.status_message
    # Only what a chat asked: the arguments and the answer are not on the spans.
    assert not any("paris" in str(v).lower() or FORECAST_MARKER in str(v) for v in forecast.attributes.values())
