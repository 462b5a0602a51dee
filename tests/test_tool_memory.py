"""A stored conversation keeps its tool calls and tool results, end to end: the official openai SDK
through the edge's /v1 with `capibara.conversation_id`, on a mesh of its own whose model is a fake
OpenAI-compatible upstream that calls tools. Turn 1 asks and gets a tool call; turn 2 sends only the
tool result, and the upstream must receive the whole history in order; GET /api/conversations/{id}
shows every turn."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from tests.support.fake_upstreams import FakeUpstream
from tests.support.mesh import running_mesh

BASE = 13000  # edge 13001, services 13050-13055, metrics 13070-13075, admin 13901
QUESTION = "What is the weather in Paris?"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def upstream():
    server = FakeUpstream(flavor="openai", models=["gpt-test"], tool_calls=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstream):
    backend = {"url": upstream.base_url, "protocol": "openai", "model_name": "gpt-test"}
    models = {"gpt-oss-20b": {"backend": backend, "defaults": {"max_tokens": 40}}}
    with running_mesh(tmp_path_factory.mktemp("tool-memory"), BASE, models, router=False) as running:
        yield running


@pytest.fixture(scope="module")
def api(mesh) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=mesh.ssl_context())
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="none", http_client=http_client, max_retries=0)


def sent_messages(upstream: FakeUpstream) -> list[dict]:
    """The messages of the upstream's last chat request, without the mesh's system message."""
    messages = upstream.chat_requests()[-1].body["messages"]
    return [m for m in messages if m["role"] != "system"]


def stored_turns(mesh, conversation_id: str) -> list[dict]:
    status, stored, _ = mesh.request("GET", f"/api/conversations/{conversation_id}")
    assert status == 200, stored
    return stored["turns"]


def test_the_tool_result_is_answered_with_the_whole_history(api, upstream, mesh):
    conversation = {"capibara": {"conversation_id": f"tools-{uuid.uuid4().hex[:8]}"}}
    ask = [{"role": "user", "content": QUESTION}]
    first = api.chat.completions.create(
        model="gpt-oss-20b", messages=ask, tools=[WEATHER], parallel_tool_calls=False, extra_body=conversation
    )
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    result = {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"}
    second = api.chat.completions.create(
        model="gpt-oss-20b", messages=[result], tools=[WEATHER], extra_body=conversation
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "tool said: 18 °C and sunny"
    user, assistant, tool = sent_messages(upstream)  # the whole history, in order
    assert user == {"role": "user", "content": QUESTION}
    assert assistant["role"] == "assistant" and not assistant.get("content")
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in assistant["tool_calls"]
    ] == [(call.id, "get_weather", {"city": "Paris"})]
    assert {k: tool.get(k) for k in result} == result
    assert upstream.chat_requests()[-1].body["messages"][0]["role"] == "system"  # the mesh's, first

    # The next question sees it all, the answer that used the result included.
    api.chat.completions.create(
        model="gpt-oss-20b", messages=[{"role": "user", "content": "And tomorrow?"}], extra_body=conversation
    )
    assert [m["role"] for m in sent_messages(upstream)] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent_messages(upstream)[3]["content"] == "tool said: 18 °C and sunny"

    turns = stored_turns(mesh, conversation["capibara"]["conversation_id"])
    assert [t["role"] for t in turns] == [
        "ROLE_USER",
        "ROLE_ASSISTANT",
        "ROLE_TOOL",
        "ROLE_ASSISTANT",
        "ROLE_USER",
        "ROLE_ASSISTANT",
    ]
    assert turns[1]["tool_calls"] == [{"id": call.id, "name": "get_weather", "arguments": call.function.arguments}]
    assert turns[2]["tool_call_id"] == call.id and turns[2]["content"] == "18 °C and sunny"


def test_parallel_calls_streamed_then_both_results(api, upstream, mesh):
    conversation = {"capibara": {"conversation_id": f"tools-{uuid.uuid4().hex[:8]}"}}
    with api.chat.completions.stream(
        model="gpt-oss-20b",
        messages=[{"role": "user", "content": QUESTION}],
        tools=[WEATHER, TIME],
        extra_body=conversation,
    ) as stream:
        calls = stream.get_final_completion().choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    results = [{"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(calls)]
    answer = api.chat.completions.create(
        model="gpt-oss-20b", messages=results, tools=[WEATHER, TIME], extra_body=conversation
    )
    assert answer.choices[0].message.content == "tool said: result 0 result 1"
    sent = sent_messages(upstream)
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent[1]["tool_calls"]] == [c.id for c in calls]
    assert [m["tool_call_id"] for m in sent[2:]] == [c.id for c in calls]
    turns = stored_turns(mesh, conversation["capibara"]["conversation_id"])
    assert [t.get("tool_call_id", "") for t in turns] == ["", "", calls[0].id, calls[1].id, ""]


def test_tool_results_that_answer_no_open_call_are_refused(api):
    conversation = {"capibara": {"conversation_id": f"tools-{uuid.uuid4().hex[:8]}"}}
    api.chat.completions.create(
        model="gpt-oss-20b", messages=[{"role": "user", "content": "hola"}], extra_body=conversation
    )
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(
            model="gpt-oss-20b",
            messages=[{"role": "tool", "tool_call_id": "call_nope", "content": "x"}],
            tools=[WEATHER],
            extra_body=conversation,
        )
    assert "no tool calls" in refused.value.message


def test_the_native_api_takes_the_tool_results_as_messages(mesh, upstream):
    conversation_id = f"tools-{uuid.uuid4().hex[:8]}"
    ask = {"conversation_id": conversation_id, "model": "gpt-oss-20b", "tools": [json.dumps(WEATHER)]}
    status, first, _ = mesh.request("POST", "/api/chat", {**ask, "message": QUESTION, "parallel_tool_calls": False})
    assert status == 200, first
    (call,) = first["tool_calls"]
    result = {"role": "ROLE_TOOL", "tool_call_id": call["id"], "content": "21 °C"}
    status, second, _ = mesh.request("POST", "/api/chat", {**ask, "messages": [result]})
    assert status == 200, second
    assert second["response"] == "tool said: 21 °C"
    assert [m["role"] for m in sent_messages(upstream)] == ["user", "assistant", "tool"]
    turns = stored_turns(mesh, conversation_id)
    assert [t["role"] for t in turns] == ["ROLE_USER", "ROLE_ASSISTANT", "ROLE_TOOL", "ROLE_ASSISTANT"]
