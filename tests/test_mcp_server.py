"""The mesh as an MCP server, driven with the MCP SDK's own client over both transports:
stdio (`capibara mcp` launched as the command, talking to this mesh's TLS edge) and Streamable
HTTP through the edge's /mcp route, with an API key configured in the mesh.

One llama-server serves all three model ids (the repository's routes name them), so routing by
meaning is real while the mesh stays small; speech is the embedded default, espeak.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.request
import uuid

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import AudioContent

from tests.support.audio import read_wav, rms
from tests.support.mesh import REPO, VENV_BIN, launched_model, mesh_config, start_mesh, stop_mesh

BASE = 30000
KEY = "mcp-test-key-0123456789abcdef"
# Named in the keys file: the gateway's usage counters call it by this name.
HTTP_KEY_NAME, HTTP_KEY = "mcp-http", "mcp-http-key-0123456789abcdef"
TOOLS = {"chat", "route", "consensus", "speak", "list_models", "toon_encode", "toon_decode"}
TRANSPORTS = ["stdio", "http"]
# A web page allowed to call the mesh: an MCP client running in a browser.
ORIGIN = "https://assistant.example.com"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mcp")
    keys = directory / "api-keys.txt"
    keys.write_text(f"{KEY}\n{HTTP_KEY_NAME}: {HTTP_KEY}\n")
    phi = launched_model(BASE + 80, max_tokens=16)
    shared = {"backend": {"url": f"http://127.0.0.1:{BASE + 80}", "protocol": "llama_cpp"}, "defaults": phi["defaults"]}
    models = {"phi": phi, "gpt-oss-20b": shared, "mixtral": shared}
    config = mesh_config(directory / "state", BASE, models)
    config["edge"].update(api_keys_file=str(keys), cors_origins=[ORIGIN])
    running = start_mesh(directory, config)
    try:
        yield running
    finally:
        stop_mesh(running)


@contextlib.asynccontextmanager
async def connect(
    mesh, transport: str, key: str | None = KEY, seen: list | None = None, mode: str = "auto", request_id: str = ""
):
    """The SDK's Client on `transport`. Over HTTP, `seen` collects every response (its headers),
    and `request_id` goes with every request as x-request-id."""
    if transport == "stdio":
        server = StdioServerParameters(
            command=str(VENV_BIN / "capibara"),
            args=["--config", str(mesh.config_path), "mcp"],
            env={"CAPIBARA_API_KEY": key} if key else {},
            cwd=str(REPO),
        )
        async with Client(server) as client:
            yield client
        return

    async def remember(response: httpx2.Response) -> None:
        if seen is not None:
            seen.append(response)

    headers = {"authorization": f"Bearer {key}"} if key else {}
    if request_id:
        headers["x-request-id"] = request_id
    async with httpx2.AsyncClient(
        verify=mesh.ssl_context(),
        headers=headers,
        timeout=httpx2.Timeout(30, read=300),
        event_hooks={"response": [remember]},
    ) as http:
        async with Client(streamable_http_client(mesh.base_url + "/mcp", http_client=http), mode=mode) as client:
            yield client


def text_of(result) -> str:
    return " ".join(block.text for block in result.content if block.type == "text")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_tool_is_listed_with_described_inputs(mesh, transport):
    async with connect(mesh, transport) as client:
        tools = (await client.list_tools()).tools
    assert {tool.name for tool in tools} == TOOLS
    for tool in tools:
        assert tool.description, tool.name
        for name, schema in tool.input_schema.get("properties", {}).items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"
    chat = next(tool for tool in tools if tool.name == "chat")
    assert chat.input_schema["required"] == ["message"]
    assert chat.input_schema["properties"]["model"]["default"] == "auto"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_chat_auto_routes_by_meaning_and_names_route_and_model(mesh, transport):
    async with connect(mesh, transport) as client:
        routed = await client.call_tool(
            "chat", {"message": "Write a Python function that reverses a linked list", "max_tokens": 8}
        )
        named = await client.call_tool("chat", {"message": "Say hello", "model": "mixtral", "max_tokens": 4})
    assert not routed.is_error, text_of(routed)
    answer = routed.structured_content
    assert answer["route"] == "programming" and answer["model_id"] == "gpt-oss-20b", answer
    assert answer["answer"].strip() and answer["completion_tokens"] > 0
    assert json.loads(text_of(routed)) == answer
    assert not named.is_error, text_of(named)
    assert named.structured_content["model_id"] == "mixtral" and named.structured_content["route"] == "explicit"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_route_consensus_and_list_models(mesh, transport):
    async with connect(mesh, transport) as client:
        route = await client.call_tool("route", {"query": "Translate 'good morning' into French"})
        vote = await client.call_tool(
            "consensus", {"prompt": "What is 2 + 2?", "models": ["phi", "mixtral"], "max_tokens": 6}
        )
        models = await client.call_tool("list_models", {})
    assert not route.is_error, text_of(route)
    decision = route.structured_content
    assert decision["route"] == "translation" and decision["model_id"] == "mixtral", decision
    assert 0 < decision["confidence"] <= 1 and decision["scores"][0]["route"] == "translation"
    assert not vote.is_error, text_of(vote)
    assert vote.structured_content["answer"].strip()
    assert sorted(c["model_id"] for c in vote.structured_content["candidates"]) == ["mixtral", "phi"]
    assert not models.is_error, text_of(models)
    listed = models.structured_content["result"]
    assert sorted(m["model_id"] for m in listed) == ["gpt-oss-20b", "mixtral", "phi"]
    assert all(m["healthy"] and m["status"] == "ok" for m in listed), listed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_speak_returns_wav_audio_content(mesh, transport):
    async with connect(mesh, transport) as client:
        spoken = await client.call_tool("speak", {"text": "Hello from the mesh.", "language": "en"})
    assert not spoken.is_error, text_of(spoken)
    (audio,) = spoken.content
    assert isinstance(audio, AudioContent) and audio.mime_type == "audio/wav"
    rate, samples = read_wav(base64.b64decode(audio.data))
    assert rate >= 16000 and len(samples) > rate // 2  # over half a second of speech
    assert rms(samples) > 100  # not silence


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_toon_round_trip_keeps_key_order(mesh, transport):
    value = {"users": [{"name": "Ana", "id": 1}, {"name": "Luis", "id": 2}], "total": 2}
    async with connect(mesh, transport) as client:
        encoded = await client.call_tool("toon_encode", {"value": value})
        assert not encoded.is_error, text_of(encoded)
        toon = encoded.structured_content["toon"]
        decoded = await client.call_tool("toon_decode", {"toon": toon})
    assert "users[2]{name,id}:" in toon, toon
    assert encoded.structured_content["toon_tokens"] < encoded.structured_content["json_tokens"]
    assert not decoded.is_error, text_of(decoded)
    assert json.dumps(decoded.structured_content["value"]) == json.dumps(value)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_input_is_a_tool_error_naming_the_problem(mesh, transport):
    async with connect(mesh, transport) as client:
        unknown = await client.call_tool("chat", {"message": "hi", "model": "gpt5"})
        empty = await client.call_tool("chat", {"message": "   "})
        missing = await client.call_tool("chat", {})
        bad_toon = await client.call_tool("toon_decode", {"toon": "users[3]{id}:\n  1\n  2"})
        bad_strategy = await client.call_tool("consensus", {"prompt": "hi", "strategy": "shout"})
        # The server is still there after all of them.
        still = await client.call_tool("route", {"query": "What is the capital of France?"})
    assert unknown.is_error and "NOT_FOUND" in text_of(unknown) and "'gpt5'" in text_of(unknown)
    assert all(model in text_of(unknown) for model in ("gpt-oss-20b", "mixtral", "phi")), text_of(unknown)
    assert empty.is_error and "message: must not be empty" in text_of(empty)
    assert missing.is_error and "message" in text_of(missing) and "required" in text_of(missing).lower()
    assert bad_toon.is_error and "INVALID_ARGUMENT" in text_of(bad_toon), text_of(bad_toon)
    assert bad_strategy.is_error and "strategy" in text_of(bad_strategy)
    assert not still.is_error, text_of(still)


async def test_stdio_without_a_key_reports_the_edges_refusal(mesh):
    async with connect(mesh, "stdio", key=None) as client:
        refused = await client.call_tool("list_models", {})
    assert refused.is_error and "UNAUTHENTICATED" in text_of(refused) and "missing API key" in text_of(refused)


async def test_http_without_a_key_is_401_at_the_edge(mesh):
    status, body, headers = mesh.request("POST", "/mcp", body={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert status == 401 and "missing API key" in body["message"], body
    assert headers["www-authenticate"].startswith("Bearer")
    seen: list[httpx2.Response] = []
    with pytest.raises(BaseException) as refused:  # an ExceptionGroup holding the SDK's MCPError
        async with connect(mesh, "http", key=None, seen=seen) as client:
            await client.list_tools()
    assert any(isinstance(e, MCPError) for e in _chain(refused.value)), refused.value
    assert seen and all(r.status_code == 401 for r in seen)


async def test_http_streams_sse_through_the_edge_and_passes_request_and_key_ids_on(mesh):
    request_id = f"mcp-test-{uuid.uuid4()}"
    seen: list[httpx2.Response] = []
    # A handshake-era client (mode="legacy"), as most desktop assistants still are: every answer
    # is a Server-Sent Events stream, which must come through Envoy whole.
    async with connect(mesh, "http", HTTP_KEY, seen=seen, mode="legacy", request_id=request_id) as client:
        answer = await client.call_tool("chat", {"message": "Say hi", "model": "phi", "max_tokens": 4})
        models = await client.call_tool("list_models", {})
    assert not answer.is_error and answer.structured_content["answer"].strip(), text_of(answer)
    assert not models.is_error, text_of(models)
    posts = [r for r in seen if r.request.method == "POST"]
    assert all(r.headers["x-request-id"] == request_id for r in posts)
    assert sum(r.headers.get("content-type", "").startswith("text/event-stream") for r in posts) >= 3
    # The edge's request id reached the services behind the tools (their call logs name it).
    log = (mesh.config_path.parent / "state" / "logs" / "capibara.log").read_text()
    calls = [json.loads(line) for line in log.splitlines() if request_id in line]
    methods = {call.get("method") for call in calls}
    assert {
        "/capibara.gateway.v1.ChatService/Complete",
        "/capibara.inference.v1.InferenceService/ListModels",
    } <= methods, calls
    # So did the id of the caller's key: the gateway counted the chat for it (only this test uses it).
    with urllib.request.urlopen(mesh.metrics_url("gateway"), timeout=10) as response:
        metrics = response.read().decode()
    counted = f'capibara_key_requests_total{{code="OK",key="{HTTP_KEY_NAME}",model="phi"}} 1.0'
    assert counted in metrics, [line for line in metrics.splitlines() if "key_requests" in line]


def _chain(error: BaseException):
    """The error, its causes and, for exception groups, what they hold."""
    stack = [error]
    while stack:
        current = stack.pop()
        yield current
        stack += list(getattr(current, "exceptions", ()))
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]


def test_a_browser_mcp_client_passes_the_cors_preflight(mesh):
    asked = "authorization, content-type, mcp-protocol-version, mcp-method, mcp-name"
    status, _, headers = mesh.request(
        "OPTIONS",
        "/mcp",
        headers={"origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": asked},
    )
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {h.strip() for h in asked.split(",")} <= allowed, allowed


# One limit, the same words on every edge: the chat core's table (capibara_grpc/chat/request.py).
OVER_THE_LIMIT = [
    ({"max_tokens": 10000}, "max_tokens", "must be between 1 and 8192, got 10000"),
    ({"temperature": 2.5}, "temperature", "must be between 0 and 2, got 2.5"),
]


@pytest.mark.parametrize("fields, name, words", OVER_THE_LIMIT, ids=[f[1] for f in OVER_THE_LIMIT])
async def test_every_edge_refuses_a_value_over_the_limit_naming_it_in_the_same_words(mesh, fields, name, words):
    auth = {"authorization": f"Bearer {KEY}"}
    rest_status, rest, _ = mesh.request("POST", "/api/chat", {"message": "hola", **fields}, headers=auth)
    v1_status, v1, _ = mesh.request(
        "POST",
        "/v1/chat/completions",
        {"model": "phi", "messages": [{"role": "user", "content": "hola"}], **fields},
        headers=auth,
    )
    async with connect(mesh, "http") as client:
        tool = await client.call_tool("chat", {"message": "hola", **fields})
    assert rest_status == 400 and rest["message"] == f"{name}: {words}", rest
    assert v1_status == 400 and v1["error"]["param"] == name and v1["error"]["message"] == words, v1
    assert tool.is_error and f"INVALID_ARGUMENT: {name}: {words}" in text_of(tool), text_of(tool)
