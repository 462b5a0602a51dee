"""The MCP tool layer without a mesh: the SDK's in-process client against build_server(). What needs
no service: schemas, input checks, a service that is not deployed or not reachable, the ports.
The tools' answers are tested end to end in tests/test_mcp_server.py."""

from __future__ import annotations

import contextlib
import socket

import grpc
import pytest
from mcp import Client

from capibara_grpc.config import ConfigError, load_config
from capibara_grpc.config.mcp_endpoint import http_addresses, http_port
from capibara_grpc.edge import envoy_config
from capibara_grpc.mcp_server.tools import build_server

TOOLS = {"chat", "route", "consensus", "speak", "list_models", "toon_encode", "toon_decode"}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.asynccontextmanager
async def unreachable():
    """The SDK's client on a server whose services sit behind a loopback port nobody listens on,
    the router not deployed. (Not a fixture: the SDK's task group must close in the test's task.)"""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{_closed_port()}")
    server = build_server(lambda service: None if service == "router" else channel, generate_timeout_s=5)
    async with Client(server) as client:
        yield client
    await channel.close()


def _text(result) -> str:
    return " ".join(block.text for block in result.content if block.type == "text")


async def test_every_input_has_a_description():
    async with unreachable() as client:
        tools = (await client.list_tools()).tools
    assert {tool.name for tool in tools} == TOOLS
    for tool in tools:
        # Structured answers come with their schema; speak's is audio content.
        assert tool.description and (tool.output_schema or tool.name == "speak"), tool.name
        for name, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{tool.name}.{name}"
            assert name != "ctx", "the SDK's context is not an input"


@pytest.mark.parametrize(
    "tool, arguments, words",
    [
        ("chat", {"message": "hi", "max_tokens": 10000}, "INVALID_ARGUMENT: max_tokens: must be between 1 and 8192"),
        ("chat", {"message": "hi", "max_tokens": 2**40}, "INVALID_ARGUMENT: max_tokens: must be between 1 and 8192"),
        ("chat", {"message": "hi", "temperature": 9}, "INVALID_ARGUMENT: temperature: must be between 0 and 2, got 9"),
        ("consensus", {"prompt": "hi", "max_tokens": 0}, "INVALID_ARGUMENT: max_tokens: must be between 1 and 8192"),
        ("consensus", {"prompt": "hi", "strategy": "shout"}, "strategy"),
        ("consensus", {"prompt": "hi", "models": ["m"] * 9}, "models"),
        ("speak", {"text": ""}, "text: must not be empty"),
        ("toon_decode", {"toon": ""}, "toon: must not be empty"),
        ("toon_encode", {}, "value"),
    ],
)
async def test_bad_input_is_a_tool_error_before_any_call(tool, arguments, words):
    async with unreachable() as client:
        result = await client.call_tool(tool, arguments)
    assert result.is_error and words in _text(result), _text(result)


async def test_a_service_not_deployed_is_named():
    async with unreachable() as client:
        result = await client.call_tool("route", {"query": "hello"})
    assert result.is_error and "the router service is not deployed" in _text(result)


async def test_an_unreachable_service_is_a_tool_error_with_its_status():
    async with unreachable() as client:
        result = await client.call_tool("list_models", {})
    assert result.is_error and "UNAVAILABLE" in _text(result), _text(result)


def _config(tmp_path, gateway: str):
    path = tmp_path / "capibara.yaml"
    path.write_text(
        "router: {enabled: false}\n"
        f"gateway: {{default_model: phi{gateway}}}\n"
        "models:\n  phi:\n    backend: {url: 'http://127.0.0.1:8081'}\n"
    )
    return path


def test_the_http_port_follows_the_gateway_unless_set(tmp_path):
    config = load_config(str(_config(tmp_path, "")))
    assert http_port(config) == 50060 and http_port(config, 41000) == 41010
    assert http_addresses(config, [("a", 50050), ("b", 7000)]) == [("a", 50060), ("b", 7010)]
    config = load_config(str(_config(tmp_path, ", mcp_port: 6100")))
    assert http_port(config, 41000) == 6100 and http_addresses(config, [("a", 50050)]) == [("a", 6100)]


def test_an_mcp_port_taken_by_a_service_stops_startup_naming_the_line(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(str(_config(tmp_path, ", mcp_port: 50051")))
    assert "capibara.yaml:2: gateway.mcp_port uses port 50051, already used by services.router.port" in str(error.value)


def test_the_edge_routes_exactly_mcp_to_the_gateways_with_the_chat_limit(tmp_path):
    config = load_config(str(_config(tmp_path, "")))
    config.edge.rate_limit.chat = 7
    config.services.endpoint("gateway").replicas = ["10.0.0.2:50050"]
    bootstrap = envoy_config.build(config, tmp_path / "d.pb", tmp_path / "c.pem", tmp_path / "k.pem")
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (route,) = [r for r in routes if r["match"] == {"path": "/mcp"}]
    # No route timeout (a stream lasts as long as the call), and the generating calls' limit.
    assert route["route"]["cluster"] == "mcp" and route["route"]["timeout"] == "0s"
    limit = route["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    assert limit["descriptors"][0]["token_bucket"]["max_tokens"] == 7
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "mcp"]
    endpoints = [
        e["endpoint"]["address"]["socket_address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert [(e["address"], e["port_value"]) for e in endpoints] == [("127.0.0.1", 50060), ("10.0.0.2", 50060)]
    assert cluster["health_checks"][0]["http_health_check"]["path"] == "/health"
