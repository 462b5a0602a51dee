"""The mesh in front of the model servers people really run, each faked over a real socket in
its own wire format (tests/support/fake_upstreams.py), plus a real llama-server reached the way
an OpenAI SDK would (`protocol: openai`, a /v1 base URL):

- gpt-oss-20b: a strict hosted API behind a key (400 to any field the OpenAI API does not define),
  streaming DeepSeek-style `reasoning_content`;
- phi: vLLM behind its own key, streaming `reasoning`, with /tokenize and max_model_len;
- mixtral: Ollama's /v1 (no tokenizer, no window, no /health);
- wrongkey: the hosted API given a key it refuses;
- local: the shipped stand-in on a llama-server the mesh launches.

Every surface runs once against a fake hosted model: REST, gRPC, /v1, MCP, consensus, memory over
two turns, the cache and the status page.
"""

from __future__ import annotations

import os
import pathlib
import time
import urllib.request

import grpc
import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.fake_upstreams import FakeUpstream, serving
from tests.support.mesh import launched_model, running_mesh
from tests.support.sse import read_events

BASE = 31000
HOSTED_KEY = "sk-hosted-3f9a1c7e5b2d4a60"
VLLM_KEY = "vllm-key-8c21d0e4f7a9b3"
REFUSED_KEY = "sk-refused-0d5e7f1a2b3c4d"
TEAM = "team-capibara-42"
ENVIRONMENT = {
    "CAPIBARA_TEST_HOSTED_KEY": HOSTED_KEY,
    "CAPIBARA_TEST_VLLM_KEY": VLLM_KEY,
    "CAPIBARA_TEST_REFUSED_KEY": REFUSED_KEY,
    "CAPIBARA_TEST_TEAM": TEAM,
}
SECRETS = (HOSTED_KEY, VLLM_KEY, REFUSED_KEY, TEAM)
HOSTED_THOUGHT = "The user greets me, so I greet back."
VLLM_THOUGHT = "Short answers suit quick facts."
# Fields of OpenAI's Chat Completions API the mesh may send (the strict fake refuses the rest).
OPENAI_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
    "reasoning_effort",
}


@pytest.fixture(scope="module")
def upstreams():
    servers = {
        "hosted": FakeUpstream(
            flavor="openai",
            api_key=HOSTED_KEY,
            models=["gpt-test"],
            reasoning=HOSTED_THOUGHT,
            reasoning_field="reasoning_content",
            required_headers={"X-Team": TEAM},
        ),
        "vllm": FakeUpstream(
            flavor="vllm", api_key=VLLM_KEY, models=["org/phi-3"], reasoning=VLLM_THOUGHT, max_model_len=3072
        ),
        "ollama": FakeUpstream(flavor="ollama", models=["mixtral:8x7b"]),
    }
    with serving(servers):
        yield servers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstreams):
    hosted, vllm, ollama = upstreams["hosted"], upstreams["vllm"], upstreams["ollama"]
    models = {
        "gpt-oss-20b": {
            "backend": {
                "url": hosted.base_url,
                "protocol": "openai",
                "model_name": "gpt-test",
                "api_key_env": "CAPIBARA_TEST_HOSTED_KEY",
                "headers": {"X-Team": "${CAPIBARA_TEST_TEAM}"},
            },
            "defaults": {"max_tokens": 40},
        },
        "phi": {
            "backend": {
                "url": vllm.base_url,
                "protocol": "openai",
                "server": "vllm",
                "model_name": "org/phi-3",
                "api_key_env": "CAPIBARA_TEST_VLLM_KEY",
            },
            "defaults": {"max_tokens": 40},
        },
        "mixtral": {
            "backend": {
                "url": ollama.base_url,
                "protocol": "openai",
                "server": "ollama",
                "model_name": "mixtral:8x7b",
                "first_token_timeout_s": 2,
            },
            "context_window": 8192,
            "defaults": {"max_tokens": 40},
            "fallbacks": ["phi"],
        },
        "wrongkey": {
            "backend": {
                "url": hosted.base_url,
                "protocol": "openai",
                "model_name": "gpt-test",
                "api_key_env": "CAPIBARA_TEST_REFUSED_KEY",
            },
        },
        "local": {
            **launched_model(BASE + 80, protocol="openai"),
            "backend": {"url": f"http://127.0.0.1:{BASE + 80}/v1", "protocol": "openai"},
        },
    }
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    os.environ.update(ENVIRONMENT)
    try:
        with running_mesh(tmp_path_factory.mktemp("model-servers"), BASE, models, cache={"enabled": True}) as running:
            yield running
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client(mesh) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=mesh.ssl_context())
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="unused", http_client=http_client, max_retries=0)


def last_chat_body(upstream: FakeUpstream) -> dict:
    return upstream.chat_requests()[-1].body


# -- named and routed chats; what each server is sent --------------------------------------------


@pytest.mark.parametrize(
    "model, upstream, extras",
    [
        ("gpt-oss-20b", "hosted", set()),
        ("phi", "vllm", {"top_k", "repetition_penalty"}),
        ("mixtral", "ollama", set()),
    ],
)
def test_a_named_chat_sends_each_server_only_what_it_understands(mesh, upstreams, model, upstream, extras):
    answer = client(mesh).chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"hello {model}"}], max_tokens=30
    )
    assert answer.choices[0].message.content == f"echo: hello {model}"
    assert answer.model == model
    body = last_chat_body(upstreams[upstream])
    assert set(body) - OPENAI_FIELDS == extras
    assert body["model"] == mesh.config["models"][model]["backend"]["model_name"]
    assert body["messages"][-1] == {"role": "user", "content": f"hello {model}"}


def test_a_routed_chat_reaches_the_hosted_model(mesh, upstreams):
    answer = client(mesh).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Write a Python function that sorts a list"}]
    )
    assert answer.model_extra["capibara"]["route_name"] == "programming"
    assert answer.model == "gpt-oss-20b"
    assert answer.choices[0].message.content == "echo: Write a Python function that sorts a list"
    request = upstreams["hosted"].chat_requests()[-1]
    assert request.headers["authorization"] == f"Bearer {HOSTED_KEY}" and request.headers["x-team"] == TEAM


def test_the_second_turn_sends_the_first_as_history_without_its_reasoning(mesh, upstreams):
    for message in ("my name is Ana", "what is my name?"):
        status, body, _ = mesh.request(
            "POST", "/api/chat", {"message": message, "model": "gpt-oss-20b", "conversation_id": "turns-1"}
        )
        assert status == 200, body
        assert body["response"] == f"echo: {message}" and body["reasoning"] == HOSTED_THOUGHT
    turns = [
        (m["role"], m["content"]) for m in last_chat_body(upstreams["hosted"])["messages"] if m["role"] != "system"
    ]
    assert turns == [("user", "my name is Ana"), ("assistant", "echo: my name is Ana"), ("user", "what is my name?")]
    status, stored, _ = mesh.request("GET", "/api/conversations/turns-1")
    assert HOSTED_THOUGHT not in str(stored)


def test_a_real_llama_server_through_protocol_openai_and_a_v1_base_url(mesh):
    answer = client(mesh).chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content.strip()
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0


# -- reasoning, kept apart -----------------------------------------------------------------------


def test_reasoning_streams_apart_from_the_answer_on_v1(mesh):
    thoughts, text, usage = [], [], None
    stream = client(mesh).chat.completions.create(
        model="gpt-oss-20b",
        messages=[{"role": "user", "content": "hola"}],
        stream=True,
        stream_options={"include_usage": True},
        reasoning_effort="low",
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            thoughts.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            text.append(choice.delta.content or "")
    assert "".join(thoughts) == HOSTED_THOUGHT
    assert "".join(text) == "echo: hola"
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_reasoning_comes_apart_in_a_whole_v1_answer_and_effort_is_passed_on(mesh, upstreams):
    answer = client(mesh).chat.completions.create(
        model="phi", messages=[{"role": "user", "content": "capital of Peru?"}], reasoning_effort="high"
    )
    message = answer.choices[0].message
    assert message.content == "echo: capital of Peru?"
    assert message.model_extra["reasoning_content"] == VLLM_THOUGHT
    assert last_chat_body(upstreams["vllm"])["reasoning_effort"] == "high"


async def test_reasoning_is_its_own_event_on_native_sse(mesh):
    status, events, _ = await read_events(mesh, "/api/chat/stream", {"message": "capital of Peru?", "model": "phi"})
    assert status == 200, events
    kinds = [next(iter(event)) for _, event in events]
    assert kinds[0] == "routing" and kinds[-1] == "done"
    reasoning = "".join(e["reasoning"]["text"] for _, e in events if "reasoning" in e)
    answer = "".join(e["token"]["text"] for _, e in events if "token" in e)
    assert reasoning == VLLM_THOUGHT and answer == "echo: capital of Peru?"
    assert kinds.index("reasoning") < kinds.index("token")
    done = events[-1][1]["done"]
    assert done["usage"]["reasoning_tokens"] > 0
    assert 0 < done["timings"]["time_to_first_reasoning_ms"] <= done["timings"]["time_to_first_token_ms"]


async def test_reasoning_over_native_grpc(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        events = [e async for e in stub.Chat(gateway_pb2.ChatRequest(message="hola", model="gpt-oss-20b"), timeout=30)]
    reasoning = "".join(e.reasoning.text for e in events if e.WhichOneof("event") == "reasoning")
    answer = "".join(e.token.text for e in events if e.WhichOneof("event") == "token")
    assert reasoning == HOSTED_THOUGHT and answer == "echo: hola"


# -- the other surfaces against a hosted model ---------------------------------------------------


async def test_mcp_chat_tool_on_a_hosted_model(mesh):
    async with httpx2.AsyncClient(verify=mesh.ssl_context(), timeout=httpx2.Timeout(30, read=120)) as http:
        async with Client(streamable_http_client(mesh.base_url + "/mcp", http_client=http)) as mcp:
            result = await mcp.call_tool("chat", {"message": "hola desde MCP", "model": "gpt-oss-20b"})
    assert not result.is_error
    answer = result.structured_content
    assert answer["answer"] == "echo: hola desde MCP" and answer["thinking"] == HOSTED_THOUGHT


def test_consensus_votes_on_answers_never_on_reasoning(mesh):
    models = ["gpt-oss-20b", "phi", "mixtral"]
    status, body, _ = mesh.request(
        "POST", "/api/consensus", {"prompt": "hola", "models": models, "strategy": "STRATEGY_VOTE"}
    )
    assert status == 200, body
    assert body["final"]["text"] == "echo: hola" and body["final"]["agreement"] == pytest.approx(1.0)
    assert sorted(c["model_id"] for c in body["candidates"]) == sorted(models)
    assert {c["text"] for c in body["candidates"]} == {"echo: hola"}


def test_the_cache_replays_the_answer_without_reasoning(mesh, upstreams):
    request = {"message": "cache me", "model": "gpt-oss-20b", "temperature": 0}
    sent = len(upstreams["hosted"].chat_requests())
    first = mesh.request("POST", "/api/chat", request)[1]
    second = mesh.request("POST", "/api/chat", request)[1]
    assert first["response"] == second["response"] == "echo: cache me"
    assert first["reasoning"] == HOSTED_THOUGHT and second["cache_hit"] == "exact" and not second.get("reasoning")
    assert len(upstreams["hosted"].chat_requests()) == sent + 1


def test_tokens_use_the_servers_tokenizer_or_say_they_are_estimated(mesh, upstreams):
    value = {"cities": [{"name": "Lima", "people": 10}, {"name": "Quito", "people": 3}]}
    counted = {}
    for model in ("phi", "gpt-oss-20b", "mixtral"):
        status, body, _ = mesh.request("POST", "/api/toon/encode", {"json": value, "model_id": model})
        assert status == 200, body
        counted[model] = body.get("tokens_estimated", False)
    assert counted == {"phi": False, "gpt-oss-20b": True, "mixtral": True}
    assert any(r.path == "/tokenize" for r in upstreams["vllm"].requests)
    assert not any(r.path.endswith(("/props", "/tokenize")) for r in upstreams["hosted"].requests)


def test_models_report_their_window_from_the_server_or_the_config(mesh):
    status, body, _ = mesh.request("GET", "/api/models")
    assert status == 200, body
    windows = {m["model_id"]: m.get("context_window", 0) for m in body["models"] if m.get("healthy")}
    assert windows["phi"] == 3072 and windows["mixtral"] == 8192 and windows["gpt-oss-20b"] == 4096


# -- upstream failures ---------------------------------------------------------------------------


def test_a_refused_key_is_a_clear_error_that_names_the_variable_not_the_key(mesh):
    with pytest.raises(openai.APIStatusError) as refused:
        client(mesh).chat.completions.create(model="wrongkey", messages=[{"role": "user", "content": "hola"}])
    assert refused.value.status_code == 500
    message = refused.value.body["message"] if "message" in refused.value.body else str(refused.value.body)
    assert "refused the mesh's API key" in message and "CAPIBARA_TEST_REFUSED_KEY" in message
    assert REFUSED_KEY not in message and REFUSED_KEY[:12] not in message
    status, health, _ = mesh.request("GET", "/health")
    assert status == 200 and health["status"] == "DEGRADED"
    assert any("wrongkey" in line and "refused the mesh's API key" in line for line in health["down"])


def test_429_cools_the_model_down_and_passes_retry_after_on(mesh, upstreams):
    ollama = upstreams["ollama"]
    ollama.fail_next(status=429, headers={"Retry-After": "3"})
    sent = len(ollama.chat_requests())
    status, body, headers = mesh.request("POST", "/api/chat", {"message": "hola", "model": "mixtral"})
    assert status == 429 and headers["retry-after"] == "3", body
    # Within the cool-down a named chat is refused without calling the server again...
    status, body, headers = mesh.request("POST", "/api/chat", {"message": "hola", "model": "mixtral"})
    assert status == 429 and int(headers["retry-after"]) <= 3, body
    assert len(ollama.chat_requests()) == sent + 1
    # ...and a routed chat fails over before its first token.
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "Write a poem about the sea at night"})
    assert status == 200, body
    assert body["routing"]["failed_models"] == ["mixtral"] and body["model_id"] != "mixtral"
    time.sleep(3)
    assert mesh.request("POST", "/api/chat", {"message": "hola", "model": "mixtral"})[0] == 200


def test_a_5xx_fails_over_and_a_named_model_says_why(mesh, upstreams):
    ollama = upstreams["ollama"]
    ollama.fail_next(status=500)
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "Write a poem about the sea at dawn"})
    assert status == 200 and body["routing"]["failed_models"] == ["mixtral"], body
    ollama.fail_next(status=502)
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "hola", "model": "mixtral"})
    assert status == 503 and "HTTP 502" in body["message"], body


def test_no_first_token_in_time_fails_over(mesh, upstreams):
    upstreams["ollama"].delay_first_chunk(4)
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "Write a poem about a quiet river"})
    assert status == 200 and body["routing"]["failed_models"] == ["mixtral"], body
    assert "first_token_timeout_s" in body["routing"]["reasoning"]


async def test_an_error_mid_stream_ends_it_in_band(mesh, upstreams):
    upstreams["vllm"].break_stream_after(1)
    status, events, _ = await read_events(mesh, "/api/chat/stream", {"message": "hola", "model": "phi"})
    assert status == 200
    assert "token" in events[1][1] or "reasoning" in events[1][1]
    assert events[-1][1]["error"]["code"] == "UNAVAILABLE"
    assert "mid-stream" in events[-1][1]["error"]["message"]


# -- where a key must never be -------------------------------------------------------------------


def test_no_key_in_the_status_page_the_metrics_or_the_state_directory(mesh):
    status, page, _ = mesh.request("GET", "/api/status")
    assert status == 200
    models = {m["model_id"]: m for m in page["models"]}
    # The status page follows the hosted model like any other: its chats, and why wrongkey is down.
    assert models["gpt-oss-20b"]["requests"] > 0 and models["gpt-oss-20b"]["status"] == "SERVING"
    assert (
        models["wrongkey"]["status"] == "NOT_SERVING" and "refused the mesh's API key" in models["wrongkey"]["detail"]
    )
    exposed = [str(page), str(mesh.request("GET", "/api/models")[1])]
    for service in ("gateway", "inference", "context"):
        with urllib.request.urlopen(mesh.metrics_url(service), timeout=10) as response:
            exposed.append(response.read().decode())
    for path in pathlib.Path(mesh.config["state_dir"]).rglob("*"):
        if path.is_file():
            exposed.append(path.read_bytes().decode(errors="replace"))
    exposed.append(mesh.output())
    for secret in SECRETS:
        assert not any(secret in text for text in exposed), f"a secret leaked ({secret[:6]}...)"


async def test_grpc_status_of_a_refused_key_is_internal_and_names_the_variable(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(gateway_pb2.CompleteRequest(message="hola", model="wrongkey"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert "refused the mesh's API key (backend.api_key_env CAPIBARA_TEST_REFUSED_KEY)" in refused.value.details()
    assert REFUSED_KEY not in refused.value.details()
